"""What to log about episodes: metric dicts, and episodes as text for report.md."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from rlkit.envs.base import Environment
from rlkit.envs.episodes import Episode


def episode_metrics(
    episodes: Sequence[Episode], envs: Sequence[Environment] | None = None, max_turns_logged: int = 8
) -> dict[str, float]:
    """Means over ``episodes`` (``env/`` keys): return, success (each environment's
    :meth:`~rlkit.envs.Environment.success`; total reward > 0.5 without ``envs``), turns,
    tokens, how episodes ended, invalid actions and environment errors, tool calls and
    their failure rate, and the mean reward of turn k among episodes that reached it
    (``env/turn_reward/k``, k < ``max_turns_logged``)."""
    if not episodes:
        return {}
    mean = lambda values: float(statistics.fmean(values)) if values else 0.0  # noqa: E731
    succeeded = [(envs[i].success(e.total_reward) if envs else e.total_reward > 0.5) for i, e in enumerate(episodes)]
    tool_calls = sum(e.count("tool_calls") for e in episodes)
    metrics = {
        "env/return_mean": mean([e.total_reward for e in episodes]),
        "env/success_rate": mean([float(s) for s in succeeded]),
        "env/turns_mean": mean([len(e.turns) for e in episodes]),
        "env/tokens_mean": mean([len(e.token_ids) for e in episodes]),
        "env/reply_tokens_mean": mean([sum(e.loss_mask) for e in episodes]),
        "env/done_rate": mean([float(e.done and e.error is None) for e in episodes]),
        "env/truncated_turns_rate": mean([float(e.truncated == "turns") for e in episodes]),
        "env/truncated_tokens_rate": mean([float(e.truncated == "tokens") for e in episodes]),
        "env/error_rate": mean([float(e.error is not None) for e in episodes]),
        "env/invalid_actions_per_episode": mean([e.count("invalid_action") for e in episodes]),
        "env/tool_calls_per_episode": tool_calls / len(episodes),
        "env/tool_failure_rate": sum(e.count("tool_errors") for e in episodes) / tool_calls if tool_calls else 0.0,
    }
    for k in range(max_turns_logged):
        rewards = [e.turns[k].reward for e in episodes if len(e.turns) > k]
        if rewards:
            metrics[f"env/turn_reward/{k}"] = mean(rewards)
    return metrics


def render_episode(episode: Episode, title: str = "episode") -> str:
    """An episode turn by turn, as a Markdown heading and a text block."""
    if episode.error:
        ending = f"environment error: {episode.error}"
    else:
        ending = f"truncated ({episode.truncated})" if episode.truncated else "done"
    lines = [f"#### {title}: return {episode.total_reward:g}, {len(episode.turns)} turns, {ending}", "", "```text"]
    for k, turn in enumerate(episode.turns):
        lines += indented(f"[{k}] observation: ", turn.observation)
        lines += indented("    reply:       ", turn.reply)
        counts = ", ".join(f"{key} {value}" for key, value in sorted(turn.info.items()) if value)
        lines.append(f"    reward:      {turn.reward:g}" + (f"  ({counts})" if counts else ""))
    if episode.turns and episode.done:
        lines += indented("    final:       ", episode.turns[-1].feedback)
    return "\n".join([*lines, "```"])


def indented(label: str, text: str) -> list[str]:
    """``label`` then ``text``, later lines of text aligned under its first."""
    first, *rest = text.splitlines() or [""]
    return [label + first, *(" " * len(label) + line for line in rest)]


def episode_table(episodes: Sequence[Episode]) -> tuple[list[str], list[list]]:
    """(columns, rows) of whole episodes, for a W&B table."""
    columns = ["instance", "return", "turns", "ending", "transcript"]
    rows = [
        [str(e.row), e.total_reward, len(e.turns), e.error or e.truncated or "done", render_episode(e)]
        for e in episodes
    ]
    return columns, rows
