"""A model's KV cache into and out of its forward, whatever the transformers version.

transformers 5.24 renamed the forward's ``past_key_values`` argument and output field to ``cache``;
the old name works there with a warning until 5.40. rlkit supports older releases too, so it passes
and reads the cache under the name the model's forward declares.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _argument_name(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_argument(model, cache) -> dict:
    """``{name: cache}``, the keyword argument that hands ``cache`` to ``model``'s forward."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return {_argument_name(type(inner)): cache}


def output_cache(output):
    """The KV cache a forward returned with ``use_cache=True``."""
    return output["cache"] if "cache" in output else output["past_key_values"]
