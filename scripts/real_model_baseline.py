"""Greedy held-out accuracy of a model on a task, in chat form, through rlkit's sampler and verifier;
and the time of a GRPO-sized rollout and update (full fine-tuning and LoRA) on that model.

    python scripts/real_model_baseline.py accuracy --task arith --options min_digits=2 max_digits=2 \\
        --template "What is {question}? Reply with just the number." --max-new-tokens 16 --num 500
    python scripts/real_model_baseline.py accuracy --task gsm8k --num 200 --max-new-tokens 256
    python scripts/real_model_baseline.py step --prompts 32 --samples 8 --max-new-tokens 16

The model defaults to the packaged SmolLM2-135M-Instruct (``package:smollm2``), converted once into
the rlkit cache; ``--model`` takes a transformers directory or a GGUF file instead.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from rlkit.models.gguf import gguf_model_dir
from rlkit.models.loading import load_tokenizer
from rlkit.models.lora import apply_lora
from rlkit.models.onednn_linear import onednn_dtypes, use_onednn_linears
from rlkit.rewards.math import math_answer_reward
from rlkit.rollout.generate import decode_responses, generate
from rlkit.rollout.logprobs import token_log_probs
from rlkit.tasks import build_task, format_prompt

GSM8K_TEMPLATE = '{question}\nLet\'s think step by step and output the final answer after "####".'


def model_dir(spec: str) -> str:
    return spec if os.path.isdir(spec) else gguf_model_dir(spec)


def load(spec: str, dtype: str = "float32"):
    directory = model_dir(spec)
    # eager attention in bf16 on CPU, as rlkit's loader chooses (rlkit.models.loading.default_attention)
    attention = "eager" if dtype == "bfloat16" else None
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype), attn_implementation=attention)
    if model.dtype in onednn_dtypes():
        use_onednn_linears(model)  # as rlkit's loader does on CPU
    return model, load_tokenizer(directory)


def task_config(args) -> SimpleNamespace:
    options = dict(option.split("=", 1) for option in args.options)
    options = {key: int(value) if value.lstrip("-").isdigit() else value for key, value in options.items()}
    path = args.path or ("/work/shared/data/gsm8k" if args.task == "gsm8k" else None)
    template = args.template or (GSM8K_TEMPLATE if args.task == "gsm8k" else "What is {question}?")
    return SimpleNamespace(
        name=args.task,
        path=path,
        prompt_template=template,
        system_prompt=args.system_prompt,
        use_chat_template=True,
        max_train_rows=None,
        options=options,
    )


def accuracy(args) -> dict:
    model, tokenizer = load(args.model)
    cfg = task_config(args)
    rows = list(build_task(cfg).split("test"))[: args.num]
    correct, tokens, samples = 0.0, 0, []
    started, cpu_started = time.perf_counter(), time.process_time()
    for start in range(0, len(rows), args.batch):
        batch = rows[start : start + args.batch]
        prompts = [format_prompt(row, cfg, tokenizer) for row in batch]
        rollout = generate(model, tokenizer, prompts, num_samples=1, max_new_tokens=args.max_new_tokens, greedy=True)
        completions = decode_responses(tokenizer, rollout)
        scores = math_answer_reward(prompts, completions, [row["answer"] for row in batch])
        correct += sum(scores)
        tokens += int(rollout.response_lengths.sum())
        samples += [
            {"question": row["question"], "answer": row["answer"], "completion": c, "correct": s}
            for row, c, s in zip(batch, completions, scores)
        ]
        print(f"{start + len(batch)}/{len(rows)}: {correct / (start + len(batch)):.3f}", flush=True)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "task": cfg.name,
        "options": cfg.options,
        "template": cfg.prompt_template,
        "system_prompt": cfg.system_prompt,
        "max_new_tokens": args.max_new_tokens,
        "problems": len(rows),
        "correct": int(correct),
        "accuracy": correct / len(rows),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # all threads: on a shared machine, cpu_seconds / threads is the uncontended time
        "response_tokens": tokens,
        "wrong_examples": [s for s in samples if not s["correct"]][:8],
        "correct_examples": [s for s in samples if s["correct"]][:4],
    }


def timed(fn) -> tuple[tuple[float, float], object]:
    """((wall seconds, CPU seconds of all threads), fn())."""
    started, cpu_started = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - started, time.process_time() - cpu_started), result


def step_time(args) -> dict:
    """One GRPO step's phases: sample prompts x samples, old and reference log-probs (no grad), and
    the update (forward + backward over all rows in micro-batches, one AdamW step)."""
    model, tokenizer = load(args.model, args.dtype)
    cfg = task_config(args)
    rows = list(build_task(cfg).split("train"))[: args.prompts]
    prompts = [format_prompt(row, cfg, tokenizer) for row in rows]
    results = {"prompts": args.prompts, "samples": args.samples, "micro_batch": args.micro_batch, "dtype": args.dtype}
    for variant in args.variants:
        if variant == "lora":
            apply_lora(model, rank=args.lora_rank, alpha=2 * args.lora_rank)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        torch.manual_seed(0)
        sample_s, rollout = timed(
            lambda: generate(
                model, tokenizer, prompts, num_samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=1.0
            )
        )
        width = rollout.response_ids.shape[1]
        micro = range(0, len(rollout), args.micro_batch)

        def score():
            with torch.no_grad():
                return [
                    token_log_probs(
                        model,
                        rollout.sequences[i : i + args.micro_batch],
                        rollout.attention_mask[i : i + args.micro_batch],
                        width,
                    )[0]
                    for i in micro
                ]

        score_s, _ = timed(score)

        def update():
            for i in micro:
                log_probs, _ = token_log_probs(
                    model,
                    rollout.sequences[i : i + args.micro_batch],
                    rollout.attention_mask[i : i + args.micro_batch],
                    width,
                )
                mask = rollout.response_mask[i : i + args.micro_batch]
                (-(log_probs * mask).sum() / mask.sum()).backward()

        backward_s, _ = timed(update)
        optimizer_s, _ = timed(lambda: (optimizer.step(), optimizer.zero_grad()))
        response_tokens = int(rollout.response_lengths.sum())
        phases = {
            "sample": sample_s,
            "log_probs_no_grad": score_s,
            "forward_backward": backward_s,
            "optimizer_step": optimizer_s,
        }
        # rlkit recomputes the old log-probs and, with a KL term, the reference's: two no-grad passes
        step = [sample_s[i] + 2 * score_s[i] + backward_s[i] + optimizer_s[i] for i in range(2)]
        results[variant] = {
            "trainable_parameters": sum(p.numel() for p in params),
            "response_tokens": response_tokens,
            "sequence_width": rollout.sequences.shape[1],
            "sampled_tokens_per_s": response_tokens / sample_s[0],
            **{f"{name}_s": round(wall, 2) for name, (wall, _) in phases.items()},
            **{f"{name}_cpu_s": round(cpu, 2) for name, (_, cpu) in phases.items()},
            "grpo_step_estimate_s": round(step[0], 2),
            "grpo_step_estimate_cpu_s": round(step[1], 2),
        }
        print(json.dumps({variant: results[variant]}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["accuracy", "step"])
    parser.add_argument("--model", default="package:smollm2")
    parser.add_argument("--task", default="arith")
    parser.add_argument("--path", default=None)
    parser.add_argument("--options", nargs="*", default=[], help="task options as key=value")
    parser.add_argument("--template", default=None)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    result = accuracy(args) if args.mode == "accuracy" else step_time(args)
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
