"""Run under torchrun by test_distributed_on_cpu.py: a few policy-gradient steps of the tiny
model per ZeRO stage, with rollouts made independent of the process count, then the evidence.

Ranks seed their sampling differently (their samples must differ), so two runs with different
process counts never sample the same responses. Here every rank samples the *whole* global batch
from one shared seed and keeps its own share of the groups: N processes then train on exactly
the rollouts of 1 process, and their rewards, gradient norms and parameters must match it.

    torchrun --nproc_per_node N tests/distributed_probe.py DIR STAGE [STAGE ...] [key=value ...]
    (writes DIR/results.pt; key=value overrides are added to the probe's, e.g. model.lora.rank=4)
"""

from __future__ import annotations

import os
import sys

import torch

STEPS = 3
OVERRIDES = [
    "run_name=probe",
    "task.options.train_size=64",
    "task.options.test_size=8",
    "trainer.prompts_per_step_global=4",
    "algo.group_size=4",
    "task.max_new_tokens=8",
    "algo.optim.lr=3e-3",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "trainer.micro_batch_per_device=4",
    "reward.fn=probe_rewards:digit_share",
    "eval.num_examples=5",
    "eval.batch_size_per_device=2",
    "eval.pass_k=0",
    "hardware.device=cpu",
    "hardware.dtype=float32",
    "logger.mode=disabled",
    # ZeRO-3 would keep a model this small whole ("persistent"); partition every parameter
    "+hardware.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
]


def compose(stage: int, extra: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from rlkit.config import register_schema

    register_schema()
    with initialize_config_module("rlkit.conf", version_base="1.3"):
        return hydra_compose("config", overrides=[*OVERRIDES, *extra, f"hardware.zero_stage={stage}"])


def full_parameters(engine) -> torch.Tensor:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return torch.cat([p.detach().flatten().clone() for p in params])


def probe_stage(stage: int, run_dir: str, extra: list[str]) -> dict:
    from rlkit.checkpoint import full_state_dict
    from rlkit.engine import all_gather_objects, rank, world_size
    from rlkit.eval.generation import evaluate_model
    from rlkit.logger import PhaseTimer
    from rlkit.loops.policy_gradient import PolicyGradientLoop
    from rlkit.rollout import generate
    from rlkit.run import base_model_dir, build_run, load_model

    cfg = compose(stage, extra)
    run = build_run(cfg, run_dir)
    start = base_model_dir(run)
    model, run.tokenizer = load_model(run, start)
    loop = PolicyGradientLoop(run, model, start)
    sample_own_share = loop.sample

    def sample_global_batch(rows, timer):
        every_rank_rows = [row for part in all_gather_objects(rows) for row in part]
        batch = sample_own_share(every_rank_rows, timer)  # the same on every rank: same seed, same weights
        share = batch.num_groups // world_size()
        return batch.select_groups(list(range(rank() * share, (rank() + 1) * share)))

    loop.sample = sample_global_batch
    metrics = []
    for step in range(1, STEPS + 1):
        torch.manual_seed(1000 + step)
        metrics.append(loop.step(step, PhaseTimer())[0])
    # ZeRO-3: ranks that stop generating at different lengths, and uneven evaluation shards
    # (5 rows over 2 ranks, 2 per batch: 2 batches and 1), must not deadlock
    generate(loop.engine.module, run.tokenizer, ["1+1="], num_samples=1, max_new_tokens=2 + 4 * rank(), greedy=True)
    accuracy = evaluate_model(run, loop.engine.module, 4)["accuracy"]
    params = full_parameters(loop.engine)
    replicas = all_gather_objects(params)
    saved = full_state_dict(loop.engine)  # what checkpoints write (ZeRO-3: gathered on rank 0)
    return {
        "metrics": metrics,
        "params": params,
        "accuracy": accuracy,
        "replicas_identical": all(torch.equal(replicas[0], other) for other in replicas),
        "saved_matches": saved is None
        or torch.equal(torch.cat([saved[name].flatten() for name, _ in loop.engine.module.named_parameters()]), params),
    }


def main() -> None:
    from rlkit.cli import finish_process
    from rlkit.engine import init_distributed, is_main_process
    from rlkit.run import seed_everything

    directory, args = sys.argv[1], sys.argv[2:]
    stages, extra = [int(a) for a in args if "=" not in a], [a for a in args if "=" in a]
    init_distributed("cpu")
    results = {}
    for stage in stages:
        seed_everything(1)
        results[stage] = probe_stage(stage, os.path.join(directory, "run"), extra)
    if is_main_process():
        torch.save(results, os.path.join(directory, "results.pt"))
    finish_process()


if __name__ == "__main__":
    main()
