#!/usr/bin/env python
"""Where the time of one GRPO step goes: the torch profiler over rlkit's two heavy phases on the
benchmark's job (8 prompts x 8 samples, 25 prompt + 32 new tokens; see scripts/bench_trl.py).

    python scripts/profile_step.py --size 25m --out docs/profile-25m.md

The page (``--out``, else stdout) names the command and commit that made it; the seeded model and prompts
go under ``--work``, outside the docs.

Profiles (1) the rollout, ``rlkit.rollout.generate.sample`` (one prefill per prompt, then decoding on
the shared KV cache), and (2) the update's forward + backward, ``token_log_probs`` with one prompt pass
per group, each after a warm-up call, and writes the operators that take the most time per phase,
then the update's products' achieved FLOP/s against the matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trl import (  # noqa: E402
    GROUP,
    MATMUL_BACKENDS,
    NEW_TOKENS,
    PROMPTS,
    SIZES,
    cpu_description,
    make_work_dir,
    matmul_flops_per_s,
    peak_shapes,
    read_jsonl,
    rlkit_commit,
)

# the operators that compute the linear layers' products (oneDNN's, or torch's BLAS: with and without bias)
PRODUCT_OPERATORS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm")


def product_flops(event) -> int:
    """FLOPs of one product call from its recorded input shapes: (..., K) x (N, K) for oneDNN's
    linear (N, its weight's first dimension, is the output width either way round), (M, K) x (K, N) for mm."""
    shapes = event.input_shapes
    if event.name == "aten::addmm":
        shapes = shapes[1:]
    first, second = shapes[0], shapes[1]
    rows = math.prod(first[:-1])
    return 2 * rows * first[-1] * (second[0] if event.name == "mkldnn::_linear_pointwise" else second[1])


def products_summary(prof, peak: float, shapes: dict) -> str:
    """The products' achieved FLOP/s in place (in the phase, between its other operators), against
    ``peak``, measured at ``shapes``: the ceiling of an update made of them, whatever the rest costs."""
    events = [e for e in prof.events() if e.name in PRODUCT_OPERATORS]
    flops = sum(product_flops(e) for e in events)
    seconds = sum(e.self_cpu_time_total for e in events) / 1e6
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    return (
        f"Products ({len(events)} calls): {flops / 1e9:.1f} GFLOP in {seconds:.3f} s of operator time = "
        f"{flops / seconds / 1e9:.1f} GFLOP/s, "
        f"{flops / seconds / peak:.0%} of this run's matmul peak ({peak / 1e9:.1f} GFLOP/s, "
        f"the best of {', '.join(shapes)} through "
        f"{' and '.join(MATMUL_BACKENDS)}); every other operator: {total - seconds:.3f} s ({1 - seconds / total:.0%})."
    )


def top_operators(prof, rows: int) -> list[tuple[str, float, float, int]]:
    """(operator, self CPU seconds, share of the total, calls), most expensive first."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total, e.count) for e in events[:rows]]


def profiled(fn) -> tuple[float, object]:
    """Wall seconds of ``fn()`` (after one warm-up call), and the profile of another call."""
    fn()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return seconds, prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="25m")
    parser.add_argument("--work", default="/tmp/rlkit_profile")
    parser.add_argument(
        "--cpu-matmul", choices=("onednn", "torch"), default="onednn", help="as rlkit's hardware.cpu_matmul"
    )
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
    model = load_pretrained(
        work["model_dir"],
        SimpleNamespace(trust_remote_code=False, attn_implementation=None),
        SimpleNamespace(device="cpu", cpu_matmul=args.cpu_matmul, zero_stage=0, dtype=dtype),
    )
    tokenizer = AutoTokenizer.from_pretrained(work["model_dir"])
    prompts = [row["prompt"] for row in read_jsonl(os.path.join(os.path.dirname(work["model_dir"]), "prompts.jsonl"))]
    ids = tokenizer(prompts, return_tensors="pt", add_special_tokens=False).input_ids
    settings = dict(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_samples=GROUP,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
    )
    rollout = sample(model, ids, torch.ones_like(ids), **settings)
    model.train()

    def update() -> None:
        log_probs, _ = token_log_probs(model, rollout.sequences, rollout.attention_mask, NEW_TOKENS, with_entropy=True)
        log_probs.sum().backward()
        model.zero_grad()

    phases = {
        "rollout (sample)": profiled(lambda: sample(model, ids, torch.ones_like(ids), **settings)),
        "update (forward + backward)": profiled(update),
    }
    shapes = peak_shapes(work["arch"], work["prompt_len"])
    peak = max(matmul_flops_per_s(*dims, dtype, backend) for dims in shapes.values() for backend in MATMUL_BACKENDS)
    lines = [
        f"# Profile of one GRPO step, `{args.size}` model ({work['params'] / 1e6:.1f}M parameters), "
        f"{PROMPTS} prompts x {GROUP} samples, {torch.get_num_threads()} threads, {args.dtype}, "
        f"cpu_matmul={args.cpu_matmul}, "
        f"{cpu_description()}",
        "",
        f"Measured by `python scripts/profile_step.py --size {args.size} --dtype {args.dtype} "
        f"--cpu-matmul {args.cpu_matmul}` "
        f"at rlkit {rlkit_commit()}.",
        "",
    ]
    for phase, (seconds, prof) in phases.items():
        lines += [f"## {phase}: {seconds:.3f} s", "", "| operator | self CPU s | share | calls |", "|---|---|---|---|"]
        lines += [
            f"| `{name}` | {cpu:.3f} | {share:.1%} | {calls} |"
            for name, cpu, share, calls in top_operators(prof, args.rows)
        ] + [""]
    lines += [products_summary(phases["update (forward + backward)"][1], peak, shapes), ""]
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
