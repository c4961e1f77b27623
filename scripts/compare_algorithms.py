#!/usr/bin/env python
"""Algorithm comparison on one task: every configuration x seed runs as its own ``rlkit train``
process (so each run's peak RSS is its own), ``--jobs`` at a time; all runs of a seed start
from that seed's warm start, trained once; then ``rlkit compare`` writes the table and plot.

    python scripts/compare_algorithms.py outputs/compare trainer.max_steps=50 trainer.eval_every=25
    python scripts/compare_algorithms.py outputs/compare --configs "algo=grpo" "algo=remax algo.group_size=8" \
        --seeds 1 2

Positional overrides after OUT_DIR apply to every run. A configuration is a space-separated set
of overrides. Rerunning the same command skips finished runs, so an interrupted sweep resumes.
The run directories stay in OUT_DIR; ``--summary docs/algorithm-comparison`` also copies the summary
(``compare.json``, ``compare.png``) to ``docs/algorithm-comparison.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ZOO = [
    "algo=grpo",
    "algo=dr_grpo",
    "algo=dapo",
    "algo=rloo",
    "algo=reinforce_pp",
    "algo=remax",
    "algo=ppo",
    "algo=gspo",
    "algo=vineppo",
    "algo=tppo",
    "algo=nlpo",
    "algo=p3o",
    "algo=copg",
]


def train(overrides: list[str], run_dir: Path, threads: int) -> bool:
    """One ``rlkit train`` process; its output goes to ``<run_dir>.log``. True if it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    command = [
        "rlkit",
        "train",
        *overrides,
        "logger.mode=disabled",
        "logger.progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.log", "w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("overrides", nargs="*", help="overrides for every run")
    parser.add_argument(
        "--configs", nargs="+", default=ZOO, help="one configuration per argument (default: the policy-gradient zoo)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time; the CPU threads are split between them")
    parser.add_argument("--summary", help="copy compare.json and compare.png to SUMMARY.json and SUMMARY.png")
    args = parser.parse_intermixed_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    warm = args.out.with_name(args.out.name + ".warmstart")  # outside OUT: rlkit compare counts every run under OUT

    def warm_start(seed: int) -> None:
        if not (
            warm / f"seed{seed}" / "warmstart" / "config.json"
        ).is_file():  # max_steps=0: warm start + its evaluation only
            train([f"seed={seed}", *args.overrides, "trainer.max_steps=0"], warm / f"seed{seed}", threads)

    def run(seed: int, config: str) -> str:
        run_dir = args.out / f"{'__'.join(config.split())}__seed{seed}".replace("=", "-").replace("/", "_").replace(
            ",", "+"
        )  # no = or , : Hydra parses hydra.run.dir
        if (run_dir / "report.json").is_file():
            return f"done earlier: {run_dir}"
        for part in ("initial_model", "warmstart"):
            if (warm / f"seed{seed}" / part).is_dir() and not (run_dir / part).exists():
                shutil.copytree(warm / f"seed{seed}" / part, run_dir / part)
        # the run dir holds the copied warm start before the run starts there
        ok = train(
            [*config.split(), f"seed={seed}", *args.overrides, "trainer.allow_nonempty_dir=true"], run_dir, threads
        )
        return f"{'ok' if ok else 'FAILED'}: {run_dir} (log {run_dir}.log)"

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(warm_start, args.seeds))
        for line in pool.map(lambda job: run(*job), [(seed, config) for seed in args.seeds for config in args.configs]):
            print(line, flush=True)
    subprocess.run(["rlkit", "compare", str(args.out)], check=True)
    if args.summary:
        for ext in ("json", "png"):
            shutil.copyfile(args.out / f"compare.{ext}", f"{args.summary}.{ext}")
            print(f"wrote {args.summary}.{ext}")


if __name__ == "__main__":
    main()
