"""Data parallelism on CPU: 2 processes (gloo) against 1, for ZeRO stages 1, 2 and 3.

See ``distributed_probe.py`` for how the rollouts are made the same for any process count;
given the same rollouts, 2 processes must log the same rewards and gradient norms as 1, end
with the same parameters (up to float summation order), and hold identical replicas.
End to end, ``hardware.num_procs=2`` under ZeRO-3 must checkpoint and resume exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, complete_checkpoints, fast_overrides, read_json, rlkit, train_records

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent


def run_probe(directory: Path, processes: int, stages: list[int], extra: tuple[str, ...] = ()) -> dict:
    import torch

    directory.mkdir()
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    done = subprocess.run(
        [sys.executable, *launcher, str(TESTS / "distributed_probe.py"), str(directory), *map(str, stages), *extra],
        env=cli_env(PYTHONPATH=str(TESTS)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return torch.load(directory / "results.pt", weights_only=False)


@pytest.mark.parametrize("extra", [(), ("model.lora.rank=4", "model.lora.alpha=8")], ids=["full", "lora"])
def test_two_processes_match_one_for_zero_1_2_3(tmp_path: Path, extra: tuple[str, ...]):
    """Also with a LoRA adapter: only it trains, its reference is the base inside the same engine."""
    import torch

    [reference] = run_probe(tmp_path / "one", 1, [0], extra).values()
    results = run_probe(tmp_path / "two", 2, [1, 2, 3], extra)
    assert any(m["actor/grad_norm"] > 0 for m in reference["metrics"]), (
        "the probe's reward gave no gradient: nothing compared"
    )
    for stage, result in results.items():
        assert result["replicas_identical"], f"ZeRO-{stage}: the ranks' parameters differ"
        assert result["saved_matches"], f"ZeRO-{stage}: the state dict checkpoints save is not the trained parameters"
        for step, (got, want) in enumerate(zip(result["metrics"], reference["metrics"]), 1):
            assert got["reward/mean"] == want["reward/mean"], (stage, step)
            assert got["actor/grad_norm"] == pytest.approx(want["actor/grad_norm"], rel=1e-4), (stage, step)
            assert got["actor/pg_loss"] == pytest.approx(want["actor/pg_loss"], rel=1e-4, abs=1e-7), (
                stage,
                step,
            )  # the minibatch's loss, not a rank's share
        assert torch.allclose(result["params"], reference["params"], atol=1e-4, rtol=0), (
            f"ZeRO-{stage}: parameters after training differ by {(result['params'] - reference['params']).abs().max():.2e}"
        )
        assert result["accuracy"] == reference["accuracy"]


# The same tiny run as the end-to-end tests, as 2 processes under ZeRO-3 with every parameter
# partitioned, and an evaluation whose shards give the ranks different numbers of batches.
ZERO3_ARGS = fast_overrides(
    "hardware=zero3",
    "hardware.device=cpu",
    "hardware.dtype=float32",
    "hardware.num_procs=2",
    "hardware.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
    "eval.num_examples=5",
    "eval.batch_size_per_device=2",
    "eval.pass_k=0",
    "trainer.eval_every=0",
    "model.warmstart.steps=2",
)


def test_zero3_two_processes_resume_exactly(tmp_path: Path):
    from safetensors.torch import load_file

    rlkit(["train", *ZERO3_ARGS, "run_name=full"], tmp_path).check()
    full = tmp_path / "outputs" / "full"
    assert complete_checkpoints(full) == [2, 4]
    resumed = tmp_path / "outputs" / "resumed"
    rlkit(["train", *ZERO3_ARGS, "run_name=resumed", f"resume={full / 'checkpoints' / '2'}"], tmp_path).check()
    timing = lambda key: key.startswith(("time/", "throughput/"))  # noqa: E731
    got, want = train_records(resumed), train_records(full)[2:]
    assert [m["step"] for m in got] == [3, 4]
    for a, b in zip(got, want):
        assert {k: v for k, v in a.items() if not timing(k)} == {k: v for k, v in b.items() if not timing(k)}, a["step"]
    a, b = (
        load_file(resumed / "checkpoints" / "4" / "model.safetensors"),
        load_file(full / "checkpoints" / "4" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), (
        "resumed ZeRO-3 weights differ from the uninterrupted run's"
    )
    assert (
        read_json(full / "report.json")["evaluations"][-1]["accuracy"]
        == read_json(resumed / "report.json")["evaluations"][-1]["accuracy"]
    )
