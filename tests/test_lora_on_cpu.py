"""LoRA through peft on a tiny random Llama: the adapter starts as the identity, the reference is the
base model, only the adapter trains, and a merged export is a plain model with the adapted logits."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlkit.models.lora import (
    adapters_disabled,
    apply_lora,
    check_resumable,
    export_merged,
    has_lora,
    save_adapter,
)
from rlkit.models.onednn_linear import OneDNNLinear, onednn_dtypes, use_onednn_linears
from rlkit.models.tiny import build_tiny_model
from rlkit.rollout.generate import generate
from rlkit.settings import ConfigError

pytest.importorskip("peft", reason="the smollm2 extra (peft) is not installed")
PROMPTS = ["12+34=", "1+2=", "40+41=", "7+7="]
# the tiny model: hidden 64, MLP 128, as many key/value heads as query heads (so k and v are 64 wide too)
RANK = 4
ADAPTER_PARAMETERS_PER_LAYER = RANK * (
    (64 + 64) * 4  # q, k, v, o: 64 -> 64
    + (64 + 128) * 3  # gate, up: 64 -> 128; down: 128 -> 64
)


@pytest.fixture(scope="module")
def tiny():
    arch = SimpleNamespace(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=256, max_position_embeddings=128
    )
    return build_tiny_model(arch, [f"{a}+{b}={a + b}" for a in range(40) for b in range(40)], seed=0)


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def with_trained_adapter(model):
    """``model`` with a LoRA adapter whose B is no longer 0 (as after some training)."""
    apply_lora(model, rank=RANK, alpha=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def test_a_new_adapter_leaves_the_model_unchanged_and_alone_is_trainable(tiny):
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    before = logits(model, tokenizer)
    apply_lora(model, rank=RANK, alpha=8)
    assert has_lora(model) and type(model).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(model, tokenizer), before)  # B = 0: W x + 0
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert sum(trainable.values()) == 2 * ADAPTER_PARAMETERS_PER_LAYER


def test_disabled_adapters_give_the_base_models_logits(tiny):
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    base = logits(model, tokenizer)
    with_trained_adapter(model)
    adapted = logits(model, tokenizer)
    assert (adapted - base).abs().max() > 0.1
    with adapters_disabled(model):
        assert torch.equal(logits(model, tokenizer), base)
    assert torch.equal(logits(model, tokenizer), adapted)


def test_disabling_is_undone_when_the_block_raises(tiny):
    model, tokenizer = with_trained_adapter(copy.deepcopy(tiny[0])), tiny[1]
    adapted = logits(model, tokenizer)
    with pytest.raises(KeyError), adapters_disabled(model):
        raise KeyError("inside")
    assert torch.equal(logits(model, tokenizer), adapted)


def test_unknown_target_modules_are_a_one_line_error_listing_the_linear_layers(tiny):
    with pytest.raises(
        ConfigError,
        match=r"^model\.lora\.target_modules: query, c_attn not in this model; its linear layers: "
        r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj$",
    ):
        apply_lora(copy.deepcopy(tiny[0]), rank=RANK, alpha=8, target_modules=["q_proj", "query", "c_attn"])
    with pytest.raises(ConfigError, match=r"^model\.lora\.rank=0: an adapter needs a positive rank"):
        apply_lora(copy.deepcopy(tiny[0]), rank=0, alpha=8)


def test_merged_export_loads_as_a_plain_model_with_the_adapted_logits(tiny, tmp_path):
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    model.save_pretrained(tmp_path / "base")
    model = with_trained_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    save_adapter(model, str(tmp_path / "checkpoint"))
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    with open(tmp_path / "checkpoint" / "adapter_config.json") as f:
        saved = json.load(f)
    assert (saved["peft_type"], saved["r"], saved["lora_alpha"]) == ("LORA", RANK, 8)
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")

    export_merged(str(tmp_path / "checkpoint"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in merged.modules())
    assert torch.allclose(logits(merged, tokenizer), logits(model, tokenizer), atol=1e-5)
    assert not os.path.exists(tmp_path / "merged" / "adapter_config.json")


def test_export_of_a_moved_base_is_a_one_line_error_unless_the_base_is_given(tiny, tmp_path):
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    model.save_pretrained(tmp_path / "base")
    save_adapter(with_trained_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base")), str(tmp_path / "ck"))
    tokenizer.save_pretrained(tmp_path / "ck")
    os.rename(tmp_path / "base", tmp_path / "moved")
    with pytest.raises(ConfigError, match=r"^the base model '.*/base' of the adapter in .*/ck is missing$"):
        export_merged(str(tmp_path / "ck"), str(tmp_path / "out"))
    export_merged(str(tmp_path / "ck"), str(tmp_path / "out"), base_model=str(tmp_path / "moved"))
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


def test_resuming_needs_the_checkpoints_kind_of_model(tiny, tmp_path):
    save_adapter(with_trained_adapter(copy.deepcopy(tiny[0])), str(tmp_path / "lora"))
    tiny[0].save_pretrained(tmp_path / "full")
    with pytest.raises(ConfigError, match=r"^model\.lora\.rank=0 but the checkpoint .*/lora holds a LoRA adapter"):
        check_resumable(str(tmp_path / "lora"), rank=0)
    with pytest.raises(ConfigError, match=r"^model\.lora\.rank=8 but the checkpoint .*/full holds a full model"):
        check_resumable(str(tmp_path / "full"), rank=8)
    with pytest.raises(
        ConfigError, match=rf"^model\.lora\.rank=8 but the adapter in the checkpoint .*/lora has rank {RANK}$"
    ):
        check_resumable(str(tmp_path / "lora"), rank=8)
    check_resumable(str(tmp_path / "lora"), rank=RANK)
    check_resumable(str(tmp_path / "full"), rank=0)


@pytest.mark.skipif(torch.float32 not in onednn_dtypes(), reason="no oneDNN float32 linear")
def test_adapters_wrap_onednn_layers_and_decoding_fast_path_agrees(tiny):
    """LoRA applied after rlkit's oneDNN conversion adapts the oneDNN layers (peft sees nn.Linear
    subclasses); the hand-written decoding step, which calls adapted layers one by one, samples
    what transformers' forward samples, with adapters on and off."""
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    use_onednn_linears(model, min_weight_elements=0)
    with_trained_adapter(model)
    assert type(model.model.layers[0].self_attn.q_proj.base_layer) is OneDNNLinear
    for disabled in (False, True):
        rollouts = []
        for hand_written in (True, False):
            torch.manual_seed(0)
            context = adapters_disabled(model) if disabled else contextlib.nullcontext()
            with context:
                rollout = generate(
                    model,
                    tokenizer,
                    PROMPTS,
                    num_samples=2,
                    max_new_tokens=8,
                    greedy=True,
                    hand_written_step=hand_written,
                )
            rollouts.append(rollout.response_ids)
        assert torch.equal(*rollouts)


def test_in_a_deepspeed_engine_only_the_adapter_trains_and_the_reference_stays(tiny):
    from omegaconf import OmegaConf

    from rlkit.engine import build_engine, init_distributed

    init_distributed("cpu")
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    base = logits(model, tokenizer)
    apply_lora(model, rank=RANK, alpha=8)
    hardware = OmegaConf.create(
        {"zero_stage": 0, "dtype": "float32", "offload_optimizer": False, "deepspeed": {}, "fused_optimizer": False}
    )
    engine = build_engine(
        model,
        hardware,
        lr=1e-2,
        betas=(0.9, 0.99),
        weight_decay=0.0,
        max_grad_norm=1.0,
        schedule="constant",
        warmup_steps=0,
        total_steps=2,
        micro_batch_per_device=4,
        grad_accum_steps=1,
        world=1,
    )
    assert sum(p.numel() for group in engine.optimizer.param_groups for p in group["params"]) == (
        2 * ADAPTER_PARAMETERS_PER_LAYER
    )
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    for _ in range(2):
        loss = engine(**batch, labels=batch["input_ids"]).loss
        engine.backward(loss)
        engine.step()
    assert (logits(engine, tokenizer) - base).abs().max() > 1e-3
    with adapters_disabled(engine):
        assert torch.equal(logits(engine, tokenizer), base)


def test_export_command_writes_a_merged_model_and_refuses_to_overwrite(tiny, tmp_path, capsys):
    from rlkit.cli import export_main

    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    model.save_pretrained(tmp_path / "base")
    adapted = with_trained_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    save_adapter(adapted, str(tmp_path / "ck"))
    tokenizer.save_pretrained(tmp_path / "ck")
    export_main([f"checkpoint={tmp_path / 'ck'}", f"output_dir={tmp_path / 'out'}"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(logits(merged, tokenizer), logits(adapted, tokenizer), atol=1e-5)
    written = sorted(os.listdir(tmp_path / "out"))
    for args, message in (
        ([f"checkpoint={tmp_path / 'ck'}", f"output_dir={tmp_path / 'out'}"], "is not empty: nothing overwritten"),
        ([f"checkpoint={tmp_path / 'ck'}"], "usage: rlkit export checkpoint=PATH output_dir=PATH"),
        ([f"checkpoint={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'o2'}"], "is not a directory"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            export_main(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == written
