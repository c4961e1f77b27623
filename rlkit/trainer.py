"""``rlkit train``: build the run, warm-start if asked, then step the loop with
logging, periodic evaluation and atomic checkpoints; resumable at any checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
from tqdm.auto import tqdm

from rlkit.checkpoint import check_finite_weights, full_state_dict, load_checkpoint, save_checkpoint
from rlkit.engine import barrier, init_distributed, is_main_process
from rlkit.engine.cpu_heap import keep_freed_memory
from rlkit.engine.determinism import use_deterministic_algorithms
from rlkit.engine.step import SKIPPED
from rlkit.errors import RunError
from rlkit.eval import evaluate
from rlkit.eval.report import Report, truncate_metrics
from rlkit.logger import PhaseTimer, RunLogger
from rlkit.loops import LOOPS
from rlkit.loops.sft import SFTLoop
from rlkit.metrics import peak_memory
from rlkit.models.lora import check_resumable
from rlkit.models.onednn_linear import onednn_dtypes
from rlkit.preemption import PreemptionWatch
from rlkit.run import (
    base_model_dir,
    build_run,
    load_model,
    resolved_config,
    resume_checkpoint,
    save_atomically,
    seed_everything,
)
from rlkit.run_dir import start_segment

PROGRESS_KEYS = ("reward/mean", "sft/loss", "actor/kl", "time/step")
log = logging.getLogger(__name__)


def train(cfg, run_dir: str) -> Report:
    """Raises :class:`Preempted` after saving a checkpoint when a preemption signal arrived."""
    watch = PreemptionWatch(
        cfg.trainer.preempt_signals, cfg.trainer.stop_signals
    )  # first: a signal during start-up must not kill the job
    use_deterministic_algorithms(cfg.hardware)
    init_distributed(cfg.hardware.device)
    if cfg.hardware.device == "cpu":
        keep_freed_memory()
        warn_about_cpu_precision(cfg.hardware.dtype)
    seed_everything(cfg.seed)
    run = build_run(cfg, run_dir)
    checkpoint = resume_checkpoint(cfg, run_dir)
    run_id = start_segment(cfg, run_dir, checkpoint)
    start_dir = base_model_dir(run)
    if cfg.model.warmstart.steps and cfg.algo.loop != "sft":
        start_dir = warm_start(run, start_dir, watch)
    model, run.tokenizer = load_model(run, policy_source(cfg, checkpoint, start_dir))
    loop = LOOPS.get(cfg.algo.loop)(run, model, start_dir)
    state = load_checkpoint(checkpoint, loop.engine, loop.extra_engines()) if checkpoint else {}
    if state:
        loop.load_state_dict(state["loop"])
        if is_main_process():
            log.info("resumed from %s at step %d of %d", checkpoint, state["step"], cfg.trainer.max_steps)
    SKIPPED.load_state_dict(state.get("skipped_steps", {"total": 0, "consecutive": 0}))
    start_step = state.get("step", 0)
    if is_main_process():
        truncate_metrics(run_dir, start_step)  # steps after the checkpoint are redone
    logger = RunLogger(cfg.logger, run_dir, run_id, resolved_config(cfg), resumed=bool(state))
    report = Report(
        run_dir,
        {
            "run_name": cfg.run_name,
            "algo": cfg.algo.name,
            "task": cfg.task.name,
            "model": cfg.model.name_or_path or cfg.model.gguf_file or "tiny",
            "lora_rank": cfg.model.lora.rank,
            "seed": cfg.seed,
            "max_steps": cfg.trainer.max_steps,
            "warmstart_sft_steps": cfg.model.warmstart.steps,
            **getattr(run.task, "summary", {}),
        },
    )
    report.truncate_after(start_step)
    try:
        run_loop(run, loop, logger, report, start_step, run_id, watch)
    finally:
        logger.finish()
        loop.close()
    if is_main_process() and report.evaluations:
        first, last = report.evaluations[0], report.evaluations[-1]
        print(
            f"held-out accuracy {first['accuracy']:.3f} ({first['label']}) -> {last['accuracy']:.3f} "
            f"({last['label']}); "
            f"report: {os.path.join(run_dir, 'report.md')}"
        )
    return report


def policy_source(cfg, checkpoint: str | None, start_dir: str) -> str:
    """Where the policy's weights load from: the checkpoint's model, or the start model for a fresh
    run and for a LoRA checkpoint (its adapter comes back with the training state). A checkpoint of
    the other kind (adapter vs whole model) is a one-line error."""
    if checkpoint is None:
        return start_dir
    check_resumable(checkpoint, cfg.model.lora.rank)
    return start_dir if cfg.model.lora.rank else checkpoint


def warn_about_cpu_precision(dtype: str) -> None:
    """bf16 on a CPU without bf16 instructions (no AVX-512 BF16 or AMX) emulates it: on an AVX2 CPU a
    bf16 matrix product ran at 15 GFLOP/s against 111 in float32, so say so before the run starts."""
    if dtype == "bfloat16" and torch.backends.mkldnn.is_available() and torch.bfloat16 not in onednn_dtypes():
        log.warning(
            "hardware.dtype=bfloat16: this CPU has no bf16 instructions, so training runs several times slower "
            "than with hardware.dtype=float32"
        )


def run_loop(
    run, loop, logger: RunLogger, report: Report, start_step: int, run_id: str, watch: PreemptionWatch
) -> None:
    cfg = run.cfg.trainer

    def checkpoint(step: int) -> None:
        started = time.perf_counter()
        logger.sync()  # the metrics up to this step are as durable as the checkpoint
        save_checkpoint(
            run.run_dir,
            step,
            loop.engine,
            run.tokenizer,
            {"run_id": run_id, "loop": loop.state_dict(), "skipped_steps": SKIPPED.state_dict()},
            run.cfg,
            cfg.keep_checkpoints,
            loop.extra_engines(),
        )
        logger.log({"time/checkpoint": time.perf_counter() - started}, step)

    if not report.evaluations:  # a fresh run dir (a requeued run already has its baseline; it evaluates on schedule)
        label = (
            "after warm start" if run.cfg.model.warmstart.steps and run.cfg.algo.loop != "sft" else "before training"
        )
        record_evaluation(run, loop, logger, report, start_step, label if start_step == 0 else f"step {start_step}")
    logger.progress(cfg.max_steps, start_step, desc=f"{run.cfg.algo.name} {run.cfg.run_name}")
    for step in range(start_step + 1, cfg.max_steps + 1):
        timer = PhaseTimer()
        started = time.perf_counter()
        skipped_before = SKIPPED.total
        metrics, samples = loop.step(step, timer)
        seconds = time.perf_counter() - started
        metrics.update(timer.metrics())
        metrics["train/skipped_steps"] = report_skipped_steps(step, skipped_before)
        metrics["time/step"] = seconds
        metrics["throughput/tokens_per_s"] = metrics.pop("tokens") / seconds
        logger.log(metrics, step, PROGRESS_KEYS)
        stop_if_stuck(step, cfg.max_skipped_steps)
        logger.table(
            "samples",
            ["prompt", "completion", "reward", "answer"],
            [[s["prompt"], s["completion"], s["reward"], s["answer"]] for s in samples[: cfg.sample_completions]],
            step,
        )
        last = step == cfg.max_steps
        if last or (cfg.eval_every and step % cfg.eval_every == 0):
            record_evaluation(run, loop, logger, report, step, "final" if last else f"step {step}")
        saved = last or (cfg.save_every and step % cfg.save_every == 0)
        if saved:
            checkpoint(step)
        if not last and watch.requested():
            if not saved:
                checkpoint(step)
            raise watch.stop(step)


def record_evaluation(run, loop, logger: RunLogger, report: Report, step: int, label: str) -> None:
    started = time.perf_counter()
    result = evaluate(run, loop)
    tables = result.pop("tables", {})  # an evaluation's own tables (an environment task's whole episodes)
    numbers = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    numbers["time/eval"] = time.perf_counter() - started
    logger.log(numbers, step)
    logger.table(
        "eval_samples",
        ["prompt", "completion", "answer", "correct"],
        [[s["prompt"], s["completion"], s["answer"], s["correct"]] for s in result["samples"]],
        step,
    )
    for name, (columns, rows) in tables.items():
        logger.table(name, columns, rows, step)
    if is_main_process():
        report.add(step, label, result)
        report.summary.update(peak_memory())
        report.write()


def report_skipped_steps(step: int, skipped_before: int) -> int:
    """Say how many optimizer steps of ``step`` were skipped (non-finite loss or gradient norm);
    returns the run's total."""
    if SKIPPED.total > skipped_before and is_main_process():
        log.warning(
            "step %d: %d optimizer step(s) skipped (%s); %d in a row, %d in all",
            step,
            SKIPPED.total - skipped_before,
            SKIPPED.reason,
            SKIPPED.consecutive,
            SKIPPED.total,
        )
    return SKIPPED.total


def stop_if_stuck(step: int, limit: int) -> None:
    """:class:`RunError` once ``limit`` optimizer steps in a row were skipped."""
    if SKIPPED.consecutive >= limit:
        raise RunError(
            f"stopped at step {step}: {SKIPPED.consecutive} optimizer steps in a row skipped ({SKIPPED.reason}); "
            "the saved checkpoints hold finite weights; check the rewards and algo.lr, or raise "
            "trainer.max_skipped_steps"
        )


def warm_start(run, base_dir: str, watch: PreemptionWatch) -> str:
    """Supervised steps on reference solutions, saved once as ``<run>/warmstart``;
    a resumed run reuses it. A stop or preemption signal ends it at once (nothing is saved
    before it completes: the next run does it again)."""
    directory = run.path("warmstart")
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    ws = run.cfg.model.warmstart
    model, run.tokenizer = load_model(run, base_dir, lora=False)  # the whole model: LoRA adapts its result
    optim = dataclasses.replace(run.algo.optim, lr=ws.lr)  # the algorithm's optimizer settings, the warm start's rate
    loop = SFTLoop(run, model, optim=optim, batch_size_global=ws.batch_size_global, max_steps=ws.steps)
    bar = tqdm(
        range(1, ws.steps + 1), desc="warm start (SFT)", disable=not (is_main_process() and run.cfg.logger.progress_bar)
    )
    for step in bar:
        skipped_before = SKIPPED.total
        metrics, _ = loop.step(step, PhaseTimer())
        report_skipped_steps(step, skipped_before)
        stop_if_stuck(step, run.cfg.trainer.max_skipped_steps)
        bar.set_postfix(loss=f"{metrics['sft/loss']:.3f}")
        if watch.requested():
            raise watch.stop(0)
    check_finite_weights({"warm-start": loop.engine}, ws.steps)
    state_dict = full_state_dict(loop.engine)
    if is_main_process():
        save_atomically(
            directory,
            lambda tmp: (
                loop.engine.module.save_pretrained(tmp, state_dict=state_dict),
                run.tokenizer.save_pretrained(tmp),
            ),
        )
    barrier()
    return directory
