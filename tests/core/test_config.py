"""TinyLoRAConfig: defaults follow the paper; every bad value fails at construction with a message naming it."""

import pytest

from tinylora_verl import DEFAULT_TARGET_MODULES, TinyLoRAConfig


def test_defaults_are_the_papers():
    c = TinyLoRAConfig()
    assert (c.r, c.u, c.tie_mode, c.init, c.v_dtype) == (2, 1, "tiled", "zeros", "float32")
    assert c.target_modules == DEFAULT_TARGET_MODULES


def test_comma_string_target_modules():
    assert TinyLoRAConfig(target_modules="q_proj, v_proj").target_modules == ("q_proj", "v_proj")


def test_dict_round_trip():
    c = TinyLoRAConfig(r=3, u=4, tie_mode="structured", tie_size=8, seed=5, init="normal", init_std=0.01)
    assert TinyLoRAConfig.from_dict(c.to_dict()) == c


def test_from_dict_leaves_verl_switches_to_the_verl_layer():
    """``enable`` is verl's switch: the verl options split it off; the core config does not know it."""
    from tinylora_verl.verl.options import parse_tinylora_block

    options, config = parse_tinylora_block({"enable": True, "budget": 13})
    assert options.enable and config.budget == 13
    with pytest.raises(ValueError, match=r"Unknown TinyLoRA config keys \['enable'\]"):
        TinyLoRAConfig.from_dict({"enable": True, "budget": 13})


BAD = [
    ({"r": 0}, r"`r` should be an integer >= 1, but the value passed is 0"),
    ({"r": 2.0}, r"`r` should be an integer >= 1, but the value passed is 2.0"),
    ({"u": -1}, r"`u` should be an integer >= 1"),
    ({"tie_size": 0}, r"`tie_size` should be an integer >= 1"),
    ({"seed": -3}, r"`seed` should be an integer >= 0"),
    ({"budget": 0}, r"`budget` should be an integer >= 1"),
    ({"budget": True}, r"`budget` should be an integer >= 1, but the value passed is True"),
    ({"tie_mode": "random"}, r"`tie_mode` should be one of \['none', 'tiled', 'structured', 'full'\], but the value passed is 'random'"),
    ({"init": "uniform"}, r"`init` should be one of \['zeros', 'normal'\]"),
    ({"v_dtype": "float64"}, r"`v_dtype` should be one of \['float32', 'bfloat16', 'float16'\]"),
    ({"hook_dtype": "bfloat16"}, r"`hook_dtype` should be one of \['float32', 'activation'\], but the value passed is 'bfloat16'"),
    ({"target_modules": []}, r"`target_modules` should be a non-empty list"),
    ({"target_modules": ["q_proj", ""]}, r"`target_modules` should be a non-empty list"),
    ({"init_std": 0.0}, r"`init_std` should be a positive number"),
]


@pytest.mark.parametrize("kwargs, msg", BAD, ids=[next(iter(k)) + "=" + repr(next(iter(k.values()))) for k, _ in BAD])
def test_bad_values_raise(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TinyLoRAConfig(**kwargs)


def test_unknown_key_raises():
    with pytest.raises(ValueError, match=r"Unknown TinyLoRA config keys \['rank'\]; allowed keys are"):
        TinyLoRAConfig.from_dict({"rank": 2})
