"""Named DDL variants and model sizes: `preset_config("ddl-cc", size="small")`."""

from typing import Any

from .configuration_ddl import DDLConfig

PRESETS: dict[str, dict[str, Any]] = {
    "baseline": {"residual_mode": "additive", "value_channels": 1},
    "ddl-scalar": {"residual_mode": "delta", "value_channels": 1},
    "ddl-cc": {
        "residual_mode": "delta",
        "value_channels": 4,
        "state_compressor": "channel",
        "embedding_expansion": True,
    },
    "ddl-cc-noec": {
        "residual_mode": "delta",
        "value_channels": 4,
        "state_compressor": "channel",
        "embedding_expansion": False,
    },
    "ddl-tc": {
        "residual_mode": "delta",
        "value_channels": 4,
        "state_compressor": "token",
        "embedding_expansion": True,
    },
    "ddl-tc-noec": {
        "residual_mode": "delta",
        "value_channels": 4,
        "state_compressor": "token",
        "embedding_expansion": False,
    },
    "write-only": {
        "residual_mode": "write_only",
        "value_channels": 4,
        "state_compressor": "channel",
        "embedding_expansion": True,
    },
}

# SwiGLU width 8/3 of the model width, tied embeddings, heads of dimension 128 at the paper's sizes.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 8192,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
    },
    "small": {
        "vocab_size": 50304,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "head_dim": 128,
        "max_position_embeddings": 1024,
    },
    "medium": {
        "vocab_size": 50304,
        "hidden_size": 1024,
        "intermediate_size": 2730,
        "num_hidden_layers": 24,
        "num_attention_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 1024,
    },
}

DEFAULT_PRESET = "ddl-cc"


def preset_config(name: str, size: str = "tiny", **overrides: Any) -> DDLConfig:
    """The `DDLConfig` of a named variant at a named size; keyword arguments override any field."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; valid presets are: {', '.join(PRESETS)}.")
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; valid sizes are: {', '.join(SIZES)}.")
    return DDLConfig(**{"tie_word_embeddings": True, **SIZES[size], **PRESETS[name], **overrides})


__all__ = ["DEFAULT_PRESET", "PRESETS", "SIZES", "preset_config"]
