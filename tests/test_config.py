"""The composed config round-trips through its saved YAML (what checkpoints and run dirs hold),
typed again component by component; a config of the layout before component config groups is a
one-line error."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from rlkit.config import ConfigError, typed_config
from rlkit.validate import validate


@pytest.mark.parametrize("preset", ["grpo", "ppo", "vineppo", "tppo", "nlpo", "dpo", "rft", "sft"])
def test_a_saved_config_is_typed_again_as_composed(compose_config, preset):
    composed = compose_config(f"algo={preset}", "task=hh" if preset == "dpo" else "task=arith")
    reloaded = typed_config(OmegaConf.create(OmegaConf.to_yaml(composed)))
    assert OmegaConf.to_container(reloaded) == OmegaConf.to_container(composed)
    for key in ("algo", "algo.advantage", "algo.value_source", "algo.preference_loss", "rollout"):
        node = OmegaConf.select(composed, key, default=None)
        if node is not None:
            assert OmegaConf.get_type(OmegaConf.select(reloaded, key)) is OmegaConf.get_type(node), key
    validate(reloaded)


def test_overrides_apply_after_typing(compose_config):
    reloaded = typed_config(OmegaConf.create(OmegaConf.to_yaml(compose_config())), ["algo.policy_loss.clip_high=0.3"])
    assert reloaded.algo.policy_loss.clip_high == 0.3


def test_a_config_of_the_old_flat_layout_is_a_one_line_error(compose_config):
    saved = OmegaConf.to_container(compose_config())
    saved["algo"] = {
        "name": "grpo",
        "loop": "policy_gradient",
        "advantage": "grpo",
        "norm_adv_by_std": True,
        "lr": 2e-4,
    }
    with pytest.raises(ConfigError, match="algo.advantage: 'grpo' is a name, not a node: this config predates"):
        typed_config(OmegaConf.create(saved))
