"""Deep Delta Learning (DDL) decoder: a Llama-style backbone whose residual additions are gated rank-1 rewrites.

Each sublayer of `DDLDecoderLayer` runs Compress - Process - Rewrite:
    x_in = compress(X)                   # (B, T, d) read of the state X (B, T, d, d_v)
    c = RMSNorm(x_in); h = F(c)          # ordinary attention or SwiGLU MLP at width d
    X = X + beta * k (v^T - k^T X)       # DDLDeltaResidual: k from h, v and beta from c
"""

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionCacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_ddl import DDLConfig
from .delta_ops import (
    _cast,
    _wide,
    channel_major,
    channel_mix_function,
    expansion_function,
    get_implementation,
    projected_rewrite,
    rewrite_function,
    token_mix_function,
)
from .state_tape import record_states

# Slots of the token-convolution states in each cache layer.
ATTN_CONV_STATE, MLP_CONV_STATE, EMBEDDING_CONV_STATE = 0, 1, 2


class DDLRMSNorm(LlamaRMSNorm):
    pass


class DDLRotaryEmbedding(LlamaRotaryEmbedding):
    pass


class DDLMLP(nn.Module):
    """SwiGLU feed-forward block, as in Llama."""

    def __init__(self, config: DDLConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DDLAttention(nn.Module):
    """Multi-head attention with grouped-query heads, rotary embeddings and optional query/key RMSNorm."""

    def __init__(self, config: DDLConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        if config.use_qk_norm:
            self.q_norm = DDLRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = DDLRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)  # (B, T, H, head_dim)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.q_norm is not None:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)  # (B, H, T, head_dim)
        key_states = key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, d)
        return self.o_proj(attn_output), attn_weights


def current_token_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The padding mask `(B, T)` of the last `length` tokens of a 2D `attention_mask`, which the token convolutions
    apply (None for no mask or a 4D one). Contiguous, so that its strides stay the same from one decoding step to the
    next (no recompilation)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -length:].contiguous()


class DDLCausalTokenConv(nn.Module):
    """The weight `(out_channels, 1, K)` of a causal depthwise convolution along tokens and its slot in the cache.

    Each input channel feeds `out_channels // in_channels` outputs. With a cache, the last `kernel_size - 1` inputs
    are kept in the cache's convolution state `state_idx` of layer `layer_idx`. Initialised to the identity on the
    current token (every output copies its input channel). The convolutions themselves are `delta_ops` operators.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, layer_idx: int, state_idx: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.layer_idx, self.state_idx = layer_idx, state_idx
        self.weight = nn.Parameter(torch.empty(out_channels, 1, kernel_size))

    def cached_window(self, inputs: torch.Tensor, cache: Cache | None) -> torch.Tensor | None:
        """Store `inputs` `(B, C, T)` in the cache; return the `kernel_size - 1` inputs before them followed by `inputs`
        `(B, C, K - 1 + T)`, or None at the start of a sequence (or without a cache)."""
        history_len = self.kernel_size - 1
        if cache is None or history_len == 0:
            return None
        has_history = cache.get_conv_state(self.layer_idx, self.state_idx) is not None
        window = cache.update_conv_state(inputs, self.layer_idx, self.state_idx, conv_kernel_size=history_len)
        if not has_history:
            return None
        length = history_len + inputs.shape[-1]
        return window if window.shape[-1] == length else window[..., -length:]  # a cache recording its past: longer


class DDLChannelCompressor(nn.Module):
    """CC: per-feature mixing over the value channels of the current token, `(B, T, d, d_v) -> (B, T, d)`.

    Also used as the final readout of the state."""

    def __init__(self, config: DDLConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.hidden_size, config.value_channels))

    def forward(self, state: torch.Tensor, cache: Cache | None = None, token_mask: torch.Tensor | None = None):
        return channel_mix_function()(state, self.weight)


class DDLTokenCompressor(nn.Module):
    """TC: causal depthwise token convolution over all `d * d_v` channels, then a read vector over `d_v`."""

    def __init__(self, config: DDLConfig, layer_idx: int, state_idx: int):
        super().__init__()
        channels = config.hidden_size * config.value_channels
        self.token_conv = DDLCausalTokenConv(channels, channels, config.state_conv_kernel_size, layer_idx, state_idx)
        self.read = nn.Parameter(torch.empty(config.value_channels))

    def forward(self, state: torch.Tensor, cache: Cache | None = None, token_mask: torch.Tensor | None = None):
        hidden, value_channels = state.shape[-2:]
        if token_mask is not None:
            state = state * token_mask[:, :, None, None].to(state.dtype)
        history = None
        if cache is not None:  # the cache keeps inputs channel-major, time last: (B, d_v * d, K - 1)
            window = self.token_conv.cached_window(channel_major(state).flatten(2).transpose(1, 2), cache)
            if window is not None:  # its history (B, d_v * d, K - 1) as (B, K - 1, d, d_v)
                history = window[..., : self.token_conv.kernel_size - 1].transpose(1, 2)
                history = history.unflatten(-1, (value_channels, hidden)).transpose(-1, -2)
        return token_mix_function()(state, self.token_conv.weight, self.read, history)  # (B, T, d)


class DDLEmbeddingExpansion(nn.Module):
    """EC: the initial state `(B, T, d, d_v)` from the embedding `(B, T, d)` by a causal depthwise token convolution.

    Initialised so that it repeats the embedding across the `d_v` channels."""

    def __init__(self, config: DDLConfig):
        super().__init__()
        hidden = config.hidden_size
        self.token_conv = DDLCausalTokenConv(
            hidden, hidden * config.value_channels, config.embedding_conv_kernel_size, 0, EMBEDDING_CONV_STATE
        )

    def forward(self, embeds: torch.Tensor, cache: Cache | None = None, token_mask: torch.Tensor | None = None):
        if token_mask is not None:  # padding reads like the zeros before the first token
            embeds = embeds * token_mask.unsqueeze(-1).to(embeds.dtype)
        window = self.token_conv.cached_window(embeds.transpose(1, 2), cache)  # (B, d, K - 1 + T)
        if window is None:  # zeros before the first token
            window = F.pad(embeds, (0, 0, self.token_conv.kernel_size - 1, 0))
        else:
            window = window.transpose(1, 2)  # (B, K - 1 + T, d), a view of the cache's
        return expansion_function()(window, self.token_conv.weight)  # (B, T, d, d_v)


def _is_plain(module: nn.Module, cls: type) -> bool:
    """Whether `module` is exactly a `cls` (not wrapped, e.g. by an adapter) without forward hooks."""
    return type(module) is cls and not (module._forward_hooks or module._forward_pre_hooks)


class DDLGateProjection(nn.Linear):
    """The gate's output layer `g`; its bias starts at `logit(beta_init / 2)` (see `_init_weights`)."""


class DDLDeltaResidual(nn.Module):
    """The residual rewrite of one sublayer: `X + beta * k (v^T - k^T X)` (or the additive / write-only control).

    `k` is the normalised sublayer output `h`; the target `v` and the gate `beta = 2 sigmoid(g(c))` are computed from
    the normalised context `c` that the sublayer read."""

    def __init__(self, config: DDLConfig):
        super().__init__()
        self.residual_mode = config.residual_mode
        self.value_activation = config.value_activation
        self.value_scale = config.value_scale
        self.eps = config.direction_eps
        if self.residual_mode == "additive":
            return
        self.value_proj = nn.Linear(
            config.hidden_size, config.value_channels, bias=config.value_activation == "sigmoid"
        )
        gate_input = config.hidden_size
        if config.beta_hidden_size is not None:
            self.beta_hidden = nn.Linear(config.hidden_size, config.beta_hidden_size, bias=False)
            gate_input = config.beta_hidden_size
        else:
            self.beta_hidden = None
        self.beta_proj = DDLGateProjection(gate_input, 1, bias=True)

    def gate(self, context: torch.Tensor) -> torch.Tensor:
        """`beta = 2 sigmoid(g(c))` in float32 (float64 for a float64 model), shape `(..., 1)`, in (0, 2)."""
        context = _wide(context)
        if self.beta_hidden is not None:
            context = torch.tanh(F.linear(context, _cast(self.beta_hidden.weight, context.dtype)))
        beta_proj = self.beta_proj
        logits = F.linear(context, _cast(beta_proj.weight, context.dtype), _cast(beta_proj.bias, context.dtype))
        return 2.0 * torch.sigmoid(logits)

    def target(self, context: torch.Tensor) -> torch.Tensor:
        """The value `v`, shape `(..., d_v)`, in float32 (float64 for a float64 model)."""
        return self._target(context, _wide(context))

    def target_and_gate(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`target(context)` and `gate(context)`, with the context widened once. With autograd, plain projections (see
        `_target`) and no gate hidden layer are one product: backward then makes one context gradient instead of two
        to add. Without autograd (decoding) the concatenation and split would cost more than the second product."""
        wide_context = _wide(context)
        if not (torch.is_grad_enabled() and self._plain_projections()):
            return self._target(context, wide_context), self.gate(wide_context)
        value_proj, beta_proj = self.value_proj, self.beta_proj
        dtype, value_channels = wide_context.dtype, value_proj.out_features
        value_bias = value_proj.bias if value_proj.bias is not None else beta_proj.bias.new_zeros(value_channels)
        weight = _cast(torch.cat([value_proj.weight, beta_proj.weight]), dtype)  # (d_v + 1, d)
        bias = _cast(torch.cat([value_bias, beta_proj.bias]), dtype)
        value, logits = F.linear(wide_context, weight, bias).split([value_channels, 1], -1)
        return self._activate(value).contiguous(), 2.0 * torch.sigmoid(logits)

    def _plain_projections(self) -> bool:
        """Whether the value and gate projections are plain `nn.Linear`s (no adapter, no hooks) and there is no gate
        hidden layer: then their weights can be used directly."""
        return self._plain_projection_weights() is not None

    def _plain_projection_weights(self) -> tuple[torch.Tensor | None, ...] | None:
        """The weight and bias of the value projection, then of the gate's, where `_plain_projections`; else None.
        One step that reads `_modules` and `_parameters`: a module attribute costs about half a microsecond, and this
        runs for every sublayer of every decoded token."""
        modules = self._modules
        value_proj, beta_proj = modules["value_proj"], modules["beta_proj"]
        if (
            self.beta_hidden is not None
            or type(value_proj) is not nn.Linear
            or type(beta_proj) is not DDLGateProjection
        ):
            return None
        if value_proj._forward_hooks or value_proj._forward_pre_hooks:
            return None
        if beta_proj._forward_hooks or beta_proj._forward_pre_hooks:
            return None
        value, gate = value_proj._parameters, beta_proj._parameters
        if "weight" in value and "bias" in value and "weight" in gate and "bias" in gate:
            return value["weight"], value["bias"], gate["weight"], gate["bias"]
        return value_proj.weight, value_proj.bias, beta_proj.weight, beta_proj.bias  # e.g. a plain tensor as weight

    def _activate(self, value: torch.Tensor) -> torch.Tensor:
        """The value projection's output as the target: `value_scale * sigmoid(.)` or as it is, at least float32."""
        if self.value_activation == "sigmoid":
            value = self.value_scale * torch.sigmoid(value)
        return _wide(value)

    def _target(self, context: torch.Tensor, wide_context: torch.Tensor) -> torch.Tensor:
        """A plain value projection (`nn.Linear` without hooks) runs as one `F.linear` on the widened context, without
        a module call; a wrapped one (e.g. a LoRA adapter) or a hooked one is called as a module on `context`."""
        value_proj = self.value_proj
        if _is_plain(value_proj, nn.Linear):
            bias = None if value_proj.bias is None else _cast(value_proj.bias, wide_context.dtype)
            value = F.linear(wide_context, _cast(value_proj.weight, wide_context.dtype), bias)
        else:
            value = value_proj(context)
        return self._activate(value)

    def forward(self, state: torch.Tensor, sublayer_output: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.residual_mode == "additive":
            return state + (sublayer_output if state.dim() == sublayer_output.dim() else sublayer_output.unsqueeze(-1))
        weights = self._plain_projection_weights()
        if weights is not None:  # on the CPU: projections and rewrite in one C call (one autograd node in training)
            value_scale = self.value_scale if self.value_activation == "sigmoid" else None
            erase = self.residual_mode == "delta"
            new_state = projected_rewrite(state, sublayer_output, context, *weights, self.eps, erase, value_scale)
            if new_state is not None:
                return new_state
        target, beta = self.target_and_gate(context)
        return rewrite_function(self.residual_mode)(state, sublayer_output, target, beta, self.eps)


def build_state_compressor(config: DDLConfig, layer_idx: int, state_idx: int) -> nn.Module | None:
    """The module that reads the state down to width d before a sublayer (None for the scalar state)."""
    if not config.expanded_state:
        return None
    if config.state_compressor == "token":
        return DDLTokenCompressor(config, layer_idx, state_idx)
    return DDLChannelCompressor(config)


class DDLDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DDLConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DDLAttention(config, layer_idx)
        self.mlp = DDLMLP(config)
        self.input_layernorm = DDLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DDLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn_state_compressor = build_state_compressor(config, layer_idx, ATTN_CONV_STATE)
        self.mlp_state_compressor = build_state_compressor(config, layer_idx, MLP_CONV_STATE)
        self.attn_residual = DDLDeltaResidual(config)
        self.mlp_residual = DDLDeltaResidual(config)

    @staticmethod
    def _read_state(compressor, state, cache, token_mask) -> torch.Tensor:
        return state if compressor is None else compressor(state, cache, token_mask)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        state = hidden_states  # (B, T, d) or (B, T, d, d_v)

        # Self attention
        context = self.input_layernorm(self._read_state(self.attn_state_compressor, state, cache, token_mask))
        attn_output, _ = self.self_attn(
            hidden_states=context,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        state = self.attn_residual(state, attn_output, context)  # was: residual + attn_output

        # Fully connected
        context = self.post_attention_layernorm(self._read_state(self.mlp_state_compressor, state, cache, token_mask))
        mlp_output = self.mlp(context)
        state = self.mlp_residual(state, mlp_output, context)  # was: residual + mlp_output
        return state


class DDLPreTrainedModel(PreTrainedModel):
    config: DDLConfig
    config_class = DDLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DDLDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": DDLDecoderLayer,
        "attentions": DDLAttention,
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual; the `auto_map` names both Auto classes so either loads the folder as remote code."""
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", "modeling_ddl.DDLModel")
            auto_map.setdefault("AutoModelForCausalLM", "modeling_ddl.DDLForCausalLM")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @staticmethod
    def create_masks_for_generate(
        config: DDLConfig,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> dict[str, torch.Tensor | None]:
        """The attention mask ("full_attention") and the padding mask of the current tokens for the token convolutions
        ("linear_attention"). The forward builds them; `generate` builds them once per step for a static cache."""
        causal_mask = create_causal_mask(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        return {
            "full_attention": causal_mask,
            "linear_attention": current_token_mask(attention_mask, inputs_embeds.shape[1]),
        }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        config = self.config
        if isinstance(module, DDLGateProjection):
            half_beta = min(max(config.beta_init / 2.0, 5e-5), 1.0 - 5e-5)
            init.constant_(module.bias, math.log(half_beta / (1.0 - half_beta)))
        elif isinstance(module, DDLChannelCompressor):
            init.constant_(module.weight, 1.0 / config.value_channels)
        elif isinstance(module, DDLTokenCompressor):
            init.constant_(module.read, 1.0 / config.value_channels)
        elif isinstance(module, DDLCausalTokenConv):
            identity = torch.zeros_like(module.weight)
            identity[..., -1] = 1.0
            init.copy_(module.weight, identity)


class DDLModel(DDLPreTrainedModel):
    def __init__(self, config: DDLConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.embedding_expansion = DDLEmbeddingExpansion(config) if config.uses_embedding_expansion else None
        self.layers = nn.ModuleList(
            [DDLDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.state_readout = DDLChannelCompressor(config) if config.expanded_state else None
        self.norm = DDLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DDLRotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        self.post_init()

    def initial_state(
        self, inputs_embeds: torch.Tensor, cache: Cache | None = None, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The residual state entering the first layer: `(B, T, d)` or `(B, T, d, d_v)`."""
        if not self.config.expanded_state:
            return inputs_embeds
        if self.embedding_expansion is not None:
            return self.embedding_expansion(inputs_embeds, cache, token_mask)
        copies = inputs_embeds.unsqueeze(-2).expand(*inputs_embeds.shape[:-1], self.config.value_channels, -1)
        return copies.contiguous().transpose(-1, -2)  # channel-major (B, T, d, d_v)

    def _state_recording(self, state: torch.Tensor) -> AbstractContextManager:
        """Backward rebuilds the residual states from the last one instead of keeping them (see `state_tape`), when
        autograd runs eagerly with the fused operators and without gradient checkpointing."""
        rebuild = (
            torch.is_grad_enabled()
            and self.config.residual_mode != "additive"
            and get_implementation() != "reference"
            and not (self.gradient_checkpointing and self.training)
            and not torch.compiler.is_compiling()
        )
        return record_states(state) if rebuild else nullcontext()

    def _check_cache(self, cache: Cache | None) -> None:
        if cache is None or "hybrid" not in self.config.layer_types:
            return
        if len(cache.layers) < self.config.num_hidden_layers or not all(
            isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers
        ):
            raise ValueError(
                "This DDL model keeps token-convolution states in its cache (token compression or embedding "
                "expansion), but the cache given has no room for them. Pass `DynamicCache(config=model.config)` "
                "or let the model create its cache."
            )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, d)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        self._check_cache(cache)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        masks = attention_mask  # `generate` with a static cache passes them already built
        if not isinstance(masks, dict):
            masks = self.create_masks_for_generate(self.config, inputs_embeds, attention_mask, cache, position_ids)
        causal_mask, token_mask = masks["full_attention"], masks.get("linear_attention")

        state = self.initial_state(inputs_embeds, cache, token_mask)  # (B, T, d) or (B, T, d, d_v)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        with self._state_recording(state):
            for decoder_layer in self.layers[: self.config.num_hidden_layers]:
                state = decoder_layer(
                    state,
                    attention_mask=causal_mask,
                    position_embeddings=position_embeddings,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=use_cache,
                    token_mask=token_mask,
                    **kwargs,
                )
            hidden_states = state if self.state_readout is None else self.state_readout(state)  # (B, T, d)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class DDLForCausalLM(DDLPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: DDLConfig):
        super().__init__(config)
        self.model = DDLModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @classmethod
    def from_llama(cls, model_or_path, **config_overrides) -> "DDLForCausalLM":
        """Build a DDL model from a `LlamaForCausalLM` (an object, or a path or Hub id to load), copying every
        backbone weight (embeddings, attention, MLP, norms, LM head); DDL-only parameters get their usual
        initialisation. Biases, non-SiLU activations and `pretraining_tp > 1` are not supported.

        What the conversion preserves: with `residual_mode="additive"`, `value_channels=1` and
        `use_qk_norm=False` the result computes the same function as the Llama model. In any other setting the
        backbone weights are kept but the function changes (query/key norms start as plain RMSNorm, the delta
        rewrite replaces the additions, the state is expanded), so the model is a warm start to fine-tune, not a
        copy.
        """
        from transformers import LlamaForCausalLM

        llama = model_or_path
        if not isinstance(llama, PreTrainedModel):
            llama = LlamaForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
        llama_config = llama.config
        if getattr(llama_config, "attention_bias", False) or getattr(llama_config, "mlp_bias", False):
            raise ValueError("from_llama: Llama models with attention_bias or mlp_bias are not supported.")
        if getattr(llama_config, "hidden_act", "silu") != "silu" or getattr(llama_config, "pretraining_tp", 1) > 1:
            raise ValueError("from_llama: only SiLU Llama models with pretraining_tp=1 are supported.")
        backbone = {
            key: getattr(llama_config, key)
            for key in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
                "rms_norm_eps",
                "initializer_range",
                "tie_word_embeddings",
                "rope_parameters",
                "attention_dropout",
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
            )
        }
        config = DDLConfig(**{**backbone, **config_overrides})
        model = cls(config).to(dtype=llama.dtype)
        missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"from_llama: Llama weights with no place in the DDL model: {unexpected}")
        backbone_missing = [key for key in missing if _is_backbone_key(key)]
        if backbone_missing and not (config.tie_word_embeddings and backbone_missing == ["lm_head.weight"]):
            raise ValueError(f"from_llama: backbone weights missing from the Llama checkpoint: {backbone_missing}")
        if hasattr(llama, "generation_config"):
            model.generation_config = llama.generation_config
        return model


def _is_backbone_key(key: str) -> bool:
    ddl_parts = ("residual", "state_compressor", "embedding_expansion", "state_readout", "q_norm", "k_norm")
    return not any(part in key for part in ddl_parts)


__all__ = [
    "DDLAttention",
    "DDLChannelCompressor",
    "DDLDecoderLayer",
    "DDLDeltaResidual",
    "DDLEmbeddingExpansion",
    "DDLForCausalLM",
    "DDLModel",
    "DDLPreTrainedModel",
    "DDLTokenCompressor",
]
