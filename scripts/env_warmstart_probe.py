#!/usr/bin/env python
"""Can rlkit's tiny model learn an environment from its expert? A warm-start probe.

For each environment: train the tiny model's byte-level BPE on rendered expert episodes,
build the 2-layer Llama (d=128), run supervised steps on expert episodes (loss on reply
tokens only, the same token layout RL episodes have), and measure held-out success
before and after with the token-in/token-out runner over rlkit's sampler, greedy and
sampled (temperature 1).

    OMP_NUM_THREADS=1 python scripts/env_warmstart_probe.py --envs maze,wordle --steps 400

Prints one JSON line per environment and setting. Not a test: numbers for the report.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import jinja2
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlkit.envs import build_environment
from rlkit.envs.base import expert_messages
from rlkit.envs.chat import TINY_CHAT_TEMPLATE
from rlkit.envs.episodes import EpisodeSettings, episodes_to_tensors, run_episodes, run_expert_episodes
from rlkit.envs.sampling import backend_sample_fn
from rlkit.envs.stats import episode_metrics, render_episode
from rlkit.loops.registry import SamplingSettings
from rlkit.models.tiny import train_tokenizer
from rlkit.rollout.backends import ROLLOUTS

SETTINGS = {
    "maze": {},
    "navigation": {},
    "wordle": {"vocabulary": 100, "test_size": 30},
    "twenty_questions": {},
    "tool_arith": {},
    "tool_arith_no_tools": {"tools": ""},
}


def environment(setting: str, extra: dict):
    name = "tool_arith" if setting.startswith("tool_arith") else setting
    return build_environment(name, {**SETTINGS[setting], **extra})


def tiny_model(tokenizer, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def supervised_steps(model, batches, steps: int, lr: float, batch_size: int, seed: int) -> float:
    """Token-mean cross-entropy on reply tokens of random expert episodes; returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        index = rng.sample(range(len(batches["input_ids"])), batch_size)
        ids, attention, loss_mask = (batches[k][index] for k in ("input_ids", "attention_mask", "loss_mask"))
        width = int(attention.sum(-1).max())
        ids, attention, loss_mask = ids[:, :width], attention[:, :width], loss_mask[:, :width]
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        target = loss_mask[:, 1:].float()
        loss = (nll * target).sum() / target.sum()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    return loss.item()


def evaluate(model, tokenizer, setting: str, rows, limits: EpisodeSettings, greedy: bool, show: int = 0) -> dict:
    envs = [environment(setting, {}) for _ in rows]
    started = time.perf_counter()
    backend = ROLLOUTS.get("hf")(
        ROLLOUTS.make_settings("hf"), model=model, tokenizer=tokenizer, sampling=SamplingSettings()
    )
    episodes = run_episodes(backend_sample_fn(backend, greedy), tokenizer, envs, rows, limits)
    for k, episode in enumerate(episodes[:show]):
        print(
            render_episode(episode, f"{setting}, held-out instance {k}, {'greedy' if greedy else 'sampled'}"),
            file=sys.stderr,
        )
    metrics = episode_metrics(episodes, envs)
    keep = (
        "env/success_rate",
        "env/turns_mean",
        "env/invalid_actions_per_episode",
        "env/tool_calls_per_episode",
        "env/tool_failure_rate",
        "env/truncated_tokens_rate",
        "env/truncated_turns_rate",
    )
    return {
        **{k.removeprefix("env/"): round(metrics[k], 3) for k in keep},
        "seconds": round(time.perf_counter() - started, 1),
    }


def probe(setting: str, args) -> list[dict]:
    env = environment(setting, {"test_size": args.test_size} if setting != "wordle" else {})
    train, test = env.rows("train", args.train_rows), env.rows("test", args.test_size)
    template = jinja2.Template(TINY_CHAT_TEMPLATE)
    corpus = [template.render(messages=expert_messages(env, row), eos_token="</s>") for row in train]
    tokenizer = train_tokenizer(corpus, 512)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    limits = EpisodeSettings(max_total_tokens=512, max_reply_tokens=48)
    demos = run_expert_episodes(tokenizer, [environment(setting, {}) for _ in train], train, limits)
    batches = episodes_to_tensors(demos, tokenizer.pad_token_id)
    model = tiny_model(tokenizer, args.seed)
    results = []
    torch.manual_seed(args.seed)
    untrained = evaluate(model, tokenizer, setting, test[: args.init_eval_size], limits, True)
    results.append({"env": setting, "stage": f"random init, greedy, {args.init_eval_size} instances", **untrained})
    started = time.perf_counter()
    loss = supervised_steps(model, batches, args.steps, args.lr, args.batch_size, args.seed)
    sft = {"steps": args.steps, "final_loss": round(loss, 4), "sft_seconds": round(time.perf_counter() - started, 1)}
    for greedy in (True, False):
        torch.manual_seed(args.seed)
        stage = "warm start, " + ("greedy" if greedy else "sampled T=1")
        results.append(
            {
                "env": setting,
                "stage": stage,
                **sft,
                **evaluate(model, tokenizer, setting, test, limits, greedy, args.show),
            }
        )
    tokens = [len(e.token_ids) for e in demos]
    results.append(
        {"env": setting, "expert_tokens_mean": round(sum(tokens) / len(tokens), 1), "expert_tokens_max": max(tokens)}
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default=",".join(SETTINGS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--init-eval-size", type=int, default=20, help="held-out instances for the random model")
    parser.add_argument("--show", type=int, default=0, help="print this many held-out episodes (stderr)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for setting in args.envs.split(","):
        for result in probe(setting, args):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
