#!/usr/bin/env python
"""Where the time of one GRPO step goes: the torch profiler over rlkit's two heavy phases on the
benchmark's job (8 prompts x 8 samples, 25 prompt + 32 new tokens; see scripts/bench_trl.py).

    python scripts/profile_step.py --size 25m --out docs/profile-25m.md

Profiles (1) the rollout, ``rlkit.rollout.generate.sample`` (one prefill per prompt, then decoding on
the shared KV cache), and (2) the update's forward + backward, ``token_log_probs`` with one prompt pass
per group, each after a warm-up call, and writes the operators that take the most time per phase.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trl import GROUP, NEW_TOKENS, PROMPTS, SIZES, make_work_dir, read_jsonl  # noqa: E402


def top_operators(prof, rows: int) -> list[tuple[str, float, float, int]]:
    """(operator, self CPU seconds, share of the total, calls), most expensive first."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total, e.count) for e in events[:rows]]


def profiled(fn, rows: int) -> tuple[float, list]:
    """Wall seconds of ``fn()`` (after one warm-up call), and its top operators under the profiler."""
    fn()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return seconds, top_operators(prof, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="25m")
    parser.add_argument("--work", default="/tmp/rlkit_profile")
    parser.add_argument("--cpu-matmul", choices=("onednn", "torch"), default="onednn", help="as rlkit's hardware.cpu_matmul")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="as rlkit's hardware.dtype")
    parser.add_argument("--rows", type=int, default=8, help="operators listed per phase")
    parser.add_argument("--out", help="Markdown file to write (default: print)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from rlkit.engine.cpu_heap import keep_freed_memory
    from rlkit.models import load_pretrained
    from rlkit.rollout.generate import sample
    from rlkit.rollout.logprobs import token_log_probs

    keep_freed_memory()  # as `rlkit train` does on CPU
    work = make_work_dir(args.size, args.work)
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    # loaded as `rlkit train` loads it on CPU: oneDNN linear layers (hardware.cpu_matmul), eager attention in bf16
    model = load_pretrained(work["model_dir"], SimpleNamespace(dtype=dtype, trust_remote_code=False, attn_implementation=None),
                            SimpleNamespace(device="cpu", cpu_matmul=args.cpu_matmul, zero_stage=0, dtype=dtype))
    tokenizer = AutoTokenizer.from_pretrained(work["model_dir"])
    prompts = [row["prompt"] for row in read_jsonl(os.path.join(os.path.dirname(work["model_dir"]), "prompts.jsonl"))]
    ids = tokenizer(prompts, return_tensors="pt", add_special_tokens=False).input_ids
    settings = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, num_samples=GROUP,
                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    rollout = sample(model, ids, torch.ones_like(ids), **settings)
    model.train()

    def update() -> None:
        log_probs, _ = token_log_probs(model, rollout.sequences, rollout.attention_mask, NEW_TOKENS, with_entropy=True)
        log_probs.sum().backward()
        model.zero_grad()

    phases = {"rollout (sample)": profiled(lambda: sample(model, ids, torch.ones_like(ids), **settings), args.rows),
              "update (forward + backward)": profiled(update, args.rows)}
    lines = [f"# Profile of one GRPO step, `{args.size}` model ({work['params'] / 1e6:.1f}M parameters), "
             f"{PROMPTS} prompts x {GROUP} samples, {torch.get_num_threads()} threads, {args.dtype}, cpu_matmul={args.cpu_matmul}", ""]
    for phase, (seconds, operators) in phases.items():
        lines += [f"## {phase}: {seconds:.3f} s", "", "| operator | self CPU s | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{name}` | {cpu:.3f} | {share:.1%} | {calls} |" for name, cpu, share, calls in operators] + [""]
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
