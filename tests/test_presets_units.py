"""Unit tests of stages/ppo/presets.py that close mutation-testing gaps: the ppo-max values PPO-MAX.md and the
README state literally, precedence of what the config gives over the preset, and the names and flag kinds."""

from __future__ import annotations

from typing import get_args

import pytest

from stages.config import PPOAlgoConfig
from stages.ppo.presets import PRESET_NAMES, PRESETS, TRICK_FLAGS, fill_preset


def test_ppo_max_critic_pretraining_is_20_iterations() -> None:
    """README: ppo-max's critic pre-training is 20 iterations ("the preset's 20 is our choice"; tiny: 16 + 20 = 36)."""
    assert PRESETS["ppo-max"]["ppo.critic_pretrain_steps"] == 20
    data: dict = {}
    fill_preset(data, "ppo-max")
    assert data["ppo"]["critic_pretrain_steps"] == 20


def test_ppo_max_reward_clip_is_0_8() -> None:
    """PPO-MAX.md / README: ppo-max clips the normalised reward to [-0.8, 0.8] (delta = 0.8)."""
    assert PRESETS["ppo-max"]["ppo.reward_clip"] == 0.8


def test_ppo_max_keeps_the_k1_kl_estimator() -> None:
    """README table: KL estimator k1 in every preset (vanilla, moss-release, ppo-max)."""
    assert {name: PRESETS[name]["ppo.kl_estimator"] for name in PRESET_NAMES} == dict.fromkeys(PRESET_NAMES, "k1")


def test_a_null_key_is_unset_and_the_preset_fills_it() -> None:
    """README: a preset fills every key the config leaves unset, "absent, or null: `kl_coef:` with no value"."""
    data: dict = {"ppo": {"kl_coef": None, "lam": None}, "train": {"critic_lr": None}}
    filled = fill_preset(data, "ppo-max")
    assert (data["ppo"]["kl_coef"], data["ppo"]["lam"], data["train"]["critic_lr"]) == (0.05, 0.9, 1.65e-6)
    assert {"ppo.kl_coef", "ppo.lam", "train.critic_lr"} <= set(filled)


def test_a_null_preset_in_the_file_means_vanilla() -> None:
    """README: the preset is --preset, else the file's ppo.preset, else vanilla; `preset:` with no value is unset."""
    data: dict = {"ppo": {"preset": None}}
    fill_preset(data, None)
    assert data["ppo"]["preset"] == "vanilla" and data["ppo"]["kl_coef"] == 0.0


@pytest.mark.parametrize("off", [False, "false", "no", "off", 0])
def test_turning_one_reward_transform_off_keeps_the_presets_other(off: object) -> None:
    """An alternative turned off (in any spelling pydantic reads as false) leaves ppo-max's reward_norm on."""
    data: dict = {"ppo": {"reward_scaling": off}}
    fill_preset(data, "ppo-max")
    assert data["ppo"]["reward_norm"] is True
    PPOAlgoConfig.model_validate(data["ppo"])


def test_a_non_boolean_alternative_does_not_switch_the_other_off() -> None:
    """A value that reads as no bool is not "on": the preset's reward_norm stays, validation names the bad value."""
    data: dict = {"ppo": {"reward_scaling": "maybe"}}
    fill_preset(data, "ppo-max")
    assert data["ppo"]["reward_norm"] is True


def test_preset_names_are_the_presets() -> None:
    """The --preset choices are exactly the three presets of the table: vanilla, moss-release, ppo-max."""
    assert PRESET_NAMES == ("vanilla", "moss-release", "ppo-max") and set(PRESET_NAMES) == set(PRESETS)


def test_unknown_preset_error_names_the_choices() -> None:
    """An unknown preset's error lists every valid name."""
    with pytest.raises(ValueError, match="unknown preset 'max'; choose one of vanilla, moss-release, ppo-max"):
        fill_preset({}, "max")


def test_trick_flag_kinds_match_the_schema() -> None:
    """Each ppo.* flag's kind is its schema field's: bool flags for bool fields, the Literal's every choice."""
    for flag in TRICK_FLAGS:
        section, name = flag.key.split(".")
        if section != "ppo":
            continue
        annotation = PPOAlgoConfig.model_fields[name].annotation
        if isinstance(flag.kind, tuple):
            assert flag.kind == get_args(annotation), flag
        else:
            assert flag.kind is annotation, flag
