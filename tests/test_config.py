"""Configuration validation and presets."""

import pytest

from ddl_transformers import PRESETS, SIZES, DDLConfig, preset_config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"value_channels": 0}, "value_channels"),
        ({"beta_init": 3}, "beta_init"),
        ({"beta_init": -0.1}, "beta_init"),
        ({"residual_mode": "multiplicative"}, "residual_mode"),
        ({"state_compressor": "pooling"}, "state_compressor"),
        ({"state_conv_kernel_size": 0}, "state_conv_kernel_size"),
        ({"embedding_conv_kernel_size": -2}, "embedding_conv_kernel_size"),
        ({"hidden_size": 100, "num_attention_heads": 6}, "num_attention_heads"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_key_value_heads"),
        ({"beta_hidden_size": 0}, "beta_hidden_size"),
        ({"value_activation": "relu"}, "value_activation"),
        ({"value_scale": 0.0}, "value_scale"),
        ({"direction_eps": 0.0}, "direction_eps"),
        ({"head_dim": 7}, "head_dim"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"invalid {field}=") as error:
        DDLConfig(**overrides)
    assert "DDLConfig" in str(error.value)


def test_allowed_values_are_listed():
    with pytest.raises(ValueError, match="'delta', 'additive', 'write_only'"):
        DDLConfig(residual_mode="nope")


def test_presets_and_sizes():
    assert preset_config("ddl-cc").value_channels == 4
    assert preset_config("ddl-cc").uses_embedding_expansion
    assert not preset_config("ddl-cc-noec").uses_embedding_expansion
    assert preset_config("ddl-tc").uses_token_compressor
    assert preset_config("baseline").residual_mode == "additive"
    assert preset_config("write-only").residual_mode == "write_only"
    assert preset_config("ddl-scalar", "small").hidden_size == 768
    assert preset_config("ddl-scalar", "medium").num_hidden_layers == 24
    assert preset_config("ddl-cc", hidden_size=64, num_attention_heads=2).hidden_size == 64
    assert preset_config("baseline").hidden_size <= 128 and set(SIZES) == {"tiny", "small", "medium"}


def test_unknown_preset_or_size_lists_the_valid_ones():
    with pytest.raises(ValueError, match="ddl-cc-noec") as error:
        preset_config("ddl-xx")
    assert all(name in str(error.value) for name in PRESETS)
    with pytest.raises(ValueError, match="tiny, small, medium"):
        preset_config("ddl-cc", size="huge")


def test_scalar_state_ignores_expansion_settings():
    config = DDLConfig(value_channels=1, embedding_expansion=True, state_compressor="token")
    assert not config.uses_embedding_expansion and not config.uses_token_compressor
    assert config.layer_types == ["full_attention"] * config.num_hidden_layers


def test_cache_layout_follows_token_convolutions():
    assert set(preset_config("ddl-tc-noec").layer_types) == {"hybrid"}
    assert set(preset_config("ddl-cc").layer_types) == {"hybrid"}  # EC keeps embedding history
    assert set(preset_config("ddl-cc-noec").layer_types) == {"full_attention"}
    assert set(preset_config("ddl-cc", embedding_conv_kernel_size=1).layer_types) == {"full_attention"}


def test_round_trip_through_json(tmp_path):
    config = preset_config("ddl-tc", beta_hidden_size=16, value_activation="linear")
    config.save_pretrained(tmp_path)
    loaded = DDLConfig.from_pretrained(tmp_path)
    for field in ("state_compressor", "beta_hidden_size", "value_activation", "value_channels", "head_dim"):
        assert getattr(loaded, field) == getattr(config, field)
