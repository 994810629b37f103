"""Configuration of Deep Delta Learning (DDL) decoder models."""

from transformers.configuration_utils import PreTrainedConfig

RESIDUAL_MODES = ("delta", "additive", "write_only")
STATE_COMPRESSORS = ("channel", "token")
VALUE_ACTIVATIONS = ("sigmoid", "linear")


class DDLConfig(PreTrainedConfig):
    r"""
    Configuration of a Llama-style decoder whose residual additions are replaced by the DDL rewrite
    `X <- X + beta * k (v^T - k^T X)` (Zhang, Liu, Wang, Gu, 2026, arXiv 2601.00417).

    Backbone fields follow [`LlamaConfig`]. DDL fields:

    residual_mode (`str`, defaults to `"delta"`):
        `"delta"` (the DDL update), `"additive"` (the ordinary `x + F(c)` baseline; with `value_channels > 1` the
        same `F(c)` is added to every channel) or `"write_only"` (`X + beta k v^T`: no erase term).
    value_channels (`int`, defaults to 4):
        `d_v`, the number of value channels of the residual state `X` of shape `(hidden_size, d_v)`. 1 is the
        scalar (ordinary vector) state.
    state_compressor (`str`, defaults to `"channel"`):
        How the state is read down to width `hidden_size` before each sublayer when `value_channels > 1`:
        `"channel"` (CC, per-feature mixing over channels) or `"token"` (TC, causal depthwise convolution over
        tokens, then a read vector over channels). Ignored when `value_channels == 1`.
    state_conv_kernel_size (`int`, defaults to 4):
        Kernel size along tokens of the TC convolution.
    embedding_expansion (`bool`, defaults to `True`):
        EC: build the initial state with a causal depthwise token convolution from the embedding instead of
        repeating it across channels. Ignored when `value_channels == 1` (there is nothing to expand).
    embedding_conv_kernel_size (`int`, defaults to 4):
        Kernel size along tokens of the EC convolution.
    beta_init (`float`, defaults to 1.0):
        Initial gate value in `[0, 2]`; the gate's output bias starts at `logit(beta_init / 2)` (the ends 0 and
        2 are clamped to 1e-4 from the boundary, where the logit is finite).
    beta_hidden_size (`int`, *optional*):
        `None` for a single linear gate, an integer for a two-layer `tanh` gate branch of that width.
    value_activation (`str`, defaults to `"sigmoid"`):
        `"sigmoid"`: `v = value_scale * sigmoid(W_v c + b)` (the authors' released code); `"linear"`: `v = W_v c`
        (the paper's text).
    value_scale (`float`, defaults to 4.0):
        Scale `s` of the sigmoid target.
    direction_eps (`float`, defaults to 1e-5):
        `eps` in `k = h / sqrt(||h||^2 + eps^2)`; a zero sublayer output gives `k = 0`.
    use_qk_norm (`bool`, defaults to `True`):
        RMSNorm on each query and key head before the rotary embedding.
    """

    model_type = "ddl"
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    # Token-convolution caches per layer: 0 = attention-sublayer TC, 1 = MLP-sublayer TC, 2 = EC (layer 0 only).
    number_of_conv_states = 3

    vocab_size: int = 50304
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_dropout: float = 0.0
    use_qk_norm: bool = True

    residual_mode: str = "delta"
    value_channels: int = 4
    state_compressor: str = "channel"
    state_conv_kernel_size: int = 4
    embedding_expansion: bool = True
    embedding_conv_kernel_size: int = 4
    beta_init: float = 1.0
    beta_hidden_size: int | None = None
    value_activation: str = "sigmoid"
    value_scale: float = 4.0
    direction_eps: float = 1e-5

    def __post_init__(self, **kwargs):
        self._check_fields()
        super().__post_init__(**kwargs)

    @property
    def expanded_state(self) -> bool:
        """Whether the residual state has more than one value channel."""
        return self.value_channels > 1

    @property
    def uses_token_compressor(self) -> bool:
        return self.expanded_state and self.state_compressor == "token" and self.state_conv_kernel_size > 1

    @property
    def uses_embedding_expansion(self) -> bool:
        return self.expanded_state and self.embedding_expansion

    @property
    def layer_types(self) -> list[str]:
        """Cache layout: "hybrid" layers (attention plus token-convolution states) when a token convolution is used."""
        needs_conv_state = self.uses_token_compressor or (
            self.uses_embedding_expansion and self.embedding_conv_kernel_size > 1
        )
        return ["hybrid" if needs_conv_state else "full_attention"] * self.num_hidden_layers

    def _check_fields(self) -> None:
        def fail(field: str, value, allowed: str) -> None:
            raise ValueError(f"DDLConfig: invalid {field}={value!r}; {allowed}.")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                fail(field, value, "expected a positive integer")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                fail(
                    "num_attention_heads",
                    self.num_attention_heads,
                    f"it must divide hidden_size={self.hidden_size}, or set head_dim explicitly",
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.residual_mode not in RESIDUAL_MODES:
            fail("residual_mode", self.residual_mode, f"allowed values are {RESIDUAL_MODES}")
        if not isinstance(self.value_channels, int) or self.value_channels < 1:
            fail("value_channels", self.value_channels, "expected an integer >= 1 (1 is the scalar state)")
        if self.state_compressor not in STATE_COMPRESSORS:
            fail("state_compressor", self.state_compressor, f"allowed values are {STATE_COMPRESSORS}")
        for field in ("state_conv_kernel_size", "embedding_conv_kernel_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                fail(field, value, "expected an integer >= 1 (1 means no token history)")
        if not 0.0 <= float(self.beta_init) <= 2.0:
            fail("beta_init", self.beta_init, "the gate lies in [0, 2]")
        if self.beta_hidden_size is not None and (
            not isinstance(self.beta_hidden_size, int) or self.beta_hidden_size < 1
        ):
            fail("beta_hidden_size", self.beta_hidden_size, "expected None (linear gate) or a positive integer")
        if self.value_activation not in VALUE_ACTIVATIONS:
            fail("value_activation", self.value_activation, f"allowed values are {VALUE_ACTIVATIONS}")
        if not self.value_scale > 0:
            fail("value_scale", self.value_scale, "expected a positive number")
        if not self.direction_eps > 0:
            fail("direction_eps", self.direction_eps, "expected a positive number")
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            fail("head_dim", self.head_dim, "expected an even positive integer (rotary embeddings rotate pairs)")
        if not isinstance(self.num_key_value_heads, int) or self.num_key_value_heads < 1:
            fail("num_key_value_heads", self.num_key_value_heads, "expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            fail(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"it must divide num_attention_heads={self.num_attention_heads}",
            )
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            fail("attention_dropout", self.attention_dropout, "expected a probability in [0, 1)")


__all__ = ["DDLConfig"]
