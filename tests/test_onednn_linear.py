"""oneDNN linear layers give nn.Linear's results (values and gradients, to float rounding),
keep the checkpoint format, and change no rollout."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from rlkit import trainer
from rlkit.models import load_pretrained, onednn_linear
from rlkit.models.loading import default_attention
from rlkit.models.onednn_linear import OneDNNLinear, fused_projection, onednn_dtypes, packed_weights, use_onednn_linears
from rlkit.models.tiny import build_tiny_model
from rlkit.rollout.generate import generate
from rlkit.rollout.logprobs import token_log_probs

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
PROMPTS = ["12+34=", "1+2=", "40+41=", "7+7="]


@pytest.fixture(scope="module")
def tiny():
    arch = SimpleNamespace(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=256, max_position_embeddings=128
    )
    return build_tiny_model(arch, [f"{a}+{b}={a + b}" for a in range(40) for b in range(40)], seed=0)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_match_nn_linear(dtype, tolerance, bias):
    if dtype not in onednn_dtypes():
        pytest.skip(
            "this CPU has no native bf16: oneDNN's bf16 linear is unavailable (test_bf16_layers_stay_on_torch_without_native_bf16)"
        )
    torch.manual_seed(0)
    reference = nn.Linear(48, 24, bias=bias, dtype=dtype)
    layer = copy.deepcopy(reference)
    assert use_onednn_linears(layer, min_weight_elements=0) == 1 and type(layer) is OneDNNLinear
    x = torch.randn(3, 5, 48, dtype=dtype)[:, 1:]  # a non-contiguous batch of sequences
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outputs = [module(value) for module, value in zip((reference, layer), inputs)]
    upstream = torch.randn_like(outputs[0])
    for output in outputs:
        (output * upstream).sum().backward()
    scale = lambda t: t.float().abs().max()  # noqa: E731
    assert (outputs[0] - outputs[1]).float().abs().max() <= tolerance * scale(outputs[0])
    assert (inputs[0].grad - inputs[1].grad).float().abs().max() <= tolerance * scale(inputs[0].grad)
    for expected, actual in zip(reference.parameters(), layer.parameters()):
        assert (expected.grad - actual.grad).float().abs().max() <= tolerance * scale(expected.grad)


def test_packed_weights_give_the_same_products_and_are_dropped_after(tiny):
    model = copy.deepcopy(tiny[0])
    use_onednn_linears(model, min_weight_elements=0)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(16, 64)
    with torch.no_grad():
        expected = nn.functional.linear(x, layer.weight)
        with packed_weights(model, rows=16):
            assert layer.packed_weight is not None
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer(x[:3]), expected[:3], rtol=1e-5, atol=1e-5)  # any number of rows
    assert all(module.packed_weight is None for module in model.modules() if isinstance(module, OneDNNLinear))
    with pytest.raises(RuntimeError, match="inference"), packed_weights(model, rows=16):
        pass


def test_checkpoints_keep_their_format_and_load_with_plain_transformers(tiny, tmp_path):
    model = copy.deepcopy(tiny[0])
    converted = use_onednn_linears(model, min_weight_elements=0)
    assert converted == sum(type(m) is nn.Linear for m in tiny[0].modules()) > 0
    assert model.state_dict().keys() == tiny[0].state_dict().keys()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, OneDNNLinear) for m in loaded.modules())
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_bf16_layers_stay_on_torch_without_native_bf16(monkeypatch):
    """Where the CPU lacks bf16 instructions oneDNN cannot build a bf16 linear: such layers keep
    torch's matmul (and train), float32 layers still convert."""
    monkeypatch.setattr(onednn_linear, "onednn_dtypes", lambda: (torch.float32,))
    model = nn.Sequential(nn.Linear(256, 256, dtype=torch.bfloat16), nn.Linear(256, 256))
    assert use_onednn_linears(model) == 1 and type(model[0]) is nn.Linear and type(model[1]) is OneDNNLinear
    model[0](torch.randn(4, 256, dtype=torch.bfloat16)).sum().backward()
    assert model[0].weight.grad is not None


def test_bf16_on_a_cpu_without_bf16_instructions_is_announced_as_slow(monkeypatch, caplog):
    for native, dtype, warned in ((False, "bfloat16", True), (False, "float32", False), (True, "bfloat16", False)):
        monkeypatch.setattr(
            trainer, "onednn_dtypes", lambda: (torch.float32, torch.bfloat16) if native else (torch.float32,)
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=trainer.__name__):
            trainer.warn_about_cpu_precision(dtype)
        assert ("no bf16 instructions" in caplog.text) == warned


def test_small_layers_stay_on_torch():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(256, 256), nn.Linear(512, 128))
    assert use_onednn_linears(model) == 2
    assert [type(layer) for layer in model] == [nn.Linear, OneDNNLinear, OneDNNLinear]


def test_load_pretrained_converts_on_cpu_unless_told_not_to_or_sharded(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "rlkit.models.onednn_linear.MIN_WEIGHT_ELEMENTS", 0
    )  # the tiny model's layers are below the default
    tiny[0].save_pretrained(tmp_path)
    model_cfg = SimpleNamespace(trust_remote_code=False, attn_implementation=None)
    hardware = lambda **kw: SimpleNamespace(
        **{"device": "cpu", "cpu_matmul": "onednn", "zero_stage": 0, "dtype": "float32", **kw}
    )  # noqa: E731
    has_onednn = lambda model: any(isinstance(m, OneDNNLinear) for m in model.modules())  # noqa: E731
    assert has_onednn(load_pretrained(str(tmp_path), model_cfg, hardware()))
    assert not has_onednn(load_pretrained(str(tmp_path), model_cfg, hardware(cpu_matmul="torch")))
    assert not has_onednn(
        load_pretrained(str(tmp_path), model_cfg, hardware(zero_stage=3))
    )  # DeepSpeed owns sharded layers


@pytest.mark.parametrize("without_native_bf16", [False, True], ids=["this CPU", "a CPU without bf16 instructions"])
def test_bf16_training_on_cpu_uses_onednn_only_where_it_computes_bf16(tiny, tmp_path, monkeypatch, without_native_bf16):
    """DeepSpeed's bf16 mode casts the model to ``hardware.dtype``: its layers go to oneDNN only
    where oneDNN computes bf16 on this CPU (elsewhere the first product failed), and train either way."""
    monkeypatch.setattr("rlkit.models.onednn_linear.MIN_WEIGHT_ELEMENTS", 0)
    if without_native_bf16:
        for name in ("rlkit.models.loading.onednn_dtypes", "rlkit.models.onednn_linear.onednn_dtypes"):
            monkeypatch.setattr(name, lambda: (torch.float32,))
    tiny[0].save_pretrained(tmp_path)
    model = load_pretrained(
        str(tmp_path),
        SimpleNamespace(trust_remote_code=False, attn_implementation=None),
        SimpleNamespace(device="cpu", cpu_matmul="onednn", zero_stage=0, dtype="bfloat16"),
    )
    native = torch.bfloat16 in onednn_dtypes() and not without_native_bf16
    assert any(isinstance(m, OneDNNLinear) for m in model.modules()) == native
    model.to(torch.bfloat16)  # as DeepSpeed's bf16 engine does
    model(torch.tensor([[5, 6, 7, 8]])).logits.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bf16_on_cpu_loads_matmul_attention_unless_told_otherwise(tiny, tmp_path):
    """The fused SDPA kernel's CPU backward is slow in bf16: null attention means eager there only."""
    tiny[0].save_pretrained(tmp_path)
    model_cfg = lambda **kw: SimpleNamespace(**{"trust_remote_code": False, "attn_implementation": None, **kw})  # noqa: E731
    hardware = lambda **kw: SimpleNamespace(
        **{"device": "cpu", "cpu_matmul": "torch", "zero_stage": 0, "dtype": "float32", **kw}
    )  # noqa: E731
    attention = lambda model_kw, hardware_kw: (
        load_pretrained(str(tmp_path), model_cfg(**model_kw), hardware(**hardware_kw)).config._attn_implementation
    )  # noqa: E731
    assert attention({}, {}) == "sdpa"
    assert attention({}, {"dtype": "bfloat16"}) == "eager"
    assert attention({"attn_implementation": "sdpa"}, {"dtype": "bfloat16"}) == "sdpa"
    assert default_attention(model_cfg(), hardware(device="cuda", dtype="bfloat16")) is None


def test_rollouts_and_log_probs_match_torch_linears(tiny):
    """Sampling with packed oneDNN weights draws the same tokens as with nn.Linear, and the
    training forward gives the same log-probs and gradients, to float tolerance."""
    reference, tokenizer = tiny
    model = copy.deepcopy(reference)
    use_onednn_linears(model, min_weight_elements=0)
    rollouts = []
    for candidate in (reference, model):
        torch.manual_seed(3)
        rollouts.append(generate(candidate, tokenizer, PROMPTS, num_samples=4, max_new_tokens=12))
    assert torch.equal(rollouts[0].response_ids, rollouts[1].response_ids)
    rollout = rollouts[0]
    results = []
    for candidate in (reference, model):
        candidate.zero_grad()
        log_probs, _ = token_log_probs(
            candidate, rollout.sequences, rollout.attention_mask, rollout.response_ids.shape[1]
        )
        (log_probs * rollout.response_mask).sum().backward()
        results.append((log_probs.detach(), [p.grad.clone() for p in candidate.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for expected, actual in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(expected, actual, rtol=1e-4, atol=1e-5)


def test_fused_projection_equals_its_layers_side_by_side():
    """One product for layers sharing an input (q/k/v, gate/up in decoding): plain, through
    oneDNN with a reordered weight, with a layer lacking a bias, and with a layer of another kind."""

    class Adapter(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(64, 48), nn.Linear(64, 16, bias=False), nn.Linear(64, 32)])
    x = torch.randn(7, 64)
    with torch.no_grad():
        expected = torch.cat([layer(x) for layer in layers], -1)
        torch.testing.assert_close(fused_projection(list(layers), rows=7)(x), expected)
        use_onednn_linears(layers, min_weight_elements=0)
        assert all(type(layer) is OneDNNLinear for layer in layers)
        torch.testing.assert_close(fused_projection(list(layers), rows=7)(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_projection(list(layers), rows=7)(x[:2]), expected[:2], rtol=1e-5, atol=1e-5)
        adapter = Adapter(64, 8)
        torch.testing.assert_close(
            fused_projection([layers[0], adapter], rows=7)(x), torch.cat([layers[0](x), adapter(x)], -1)
        )
