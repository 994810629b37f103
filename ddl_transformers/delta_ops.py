"""The DDL residual operators: the delta rewrite, its write-only control and the compressors' mixing.

Shapes: the state is `(..., d)` (scalar state, `d_v = 1`) or `(..., d, d_v)`; the direction `(..., d)`; the target
`(..., d_v)` (`(..., 1)` for a scalar state); the gate `(..., 1)`.

Two implementations share each signature. The reference ones (`delta_update`, `write_only_update`, `channel_mix`,
`token_mix`, `expand_embeddings`) are plain autograd code that reads like the equations. The fused ones save only
what backward needs (the input state, the sublayer output `h` and per-token scalars), recompute the rest, and return
expanded states *channel-major*: a `(..., d, d_v)` tensor whose memory is laid out `(..., d_v, d)`, so that every
pass over the state is a contiguous loop over `d` (inputs may have any layout). The fused rewrite also reports what
it wrote to an active `StateTape` (`state_tape.py`), which then rebuilds the states in backward instead of keeping
them. `rewrite_function`, `channel_mix_function`, `token_mix_function` and `expansion_function` are the one place
that chooses; `set_implementation("reference")` forces the reference (tests compare the two).
"""

import functools
import importlib
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .state_tape import record_rewrite

IMPLEMENTATIONS = ("native", "fused", "reference", "triton")
DEFAULT_IMPLEMENTATION = "native"
_implementation = DEFAULT_IMPLEMENTATION


def set_implementation(name: str) -> None:
    """Choose the operators used by the model: `"native"` (default: the fused operators, with their paths without
    autograd on float32 CPU tensors as C kernels, see `cpu_kernels.py`; the fused operators where those cannot be
    built), `"fused"` (PyTorch operators only), `"reference"`, or `"triton"` (the fused operators with the rewrite
    and TC's token convolution as Triton kernels on CUDA tensors; needs Triton and the installed package)."""
    global _implementation
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown DDL operator implementation {name!r}; allowed values are {IMPLEMENTATIONS}.")
    if name == "triton" and _triton_module() is None:
        raise ValueError(
            "The triton implementation needs the `triton` package (`pip install triton`) and the installed "
            "`ddl_transformers` package (it is not part of a saved model's remote code); use 'fused' instead."
        )
    _implementation = name


def get_implementation() -> str:
    return _implementation


# ---------------------------------------------------------------------------------------------------------------
# Reference operators
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _triton_module() -> ModuleType | None:
    """`triton_rewrite`, or None where Triton (or, in remote code, the module) is missing."""
    try:
        return importlib.import_module(f"{__package__}.triton_rewrite")
    except ImportError:
        return None


def _triton_for(tensor: torch.Tensor) -> ModuleType | None:
    """The Triton kernels when chosen and usable: a float32/bfloat16/float16 tensor on CUDA (any device while Triton
    interprets), and no `torch.compile` tracing (Inductor fuses the eager operators itself; the kernels are opaque to
    it); else None."""
    if _implementation != "triton" or torch.compiler.is_compiling() or tensor.dtype == torch.float64:
        return None
    module = _triton_module()
    return module if module is not None and (tensor.is_cuda or module.INTERPRETED) else None


@functools.cache
def _native_module() -> ModuleType | None:
    """`cpu_kernels` with its library loaded, or None (with a warning) where it cannot be built or imported (in remote
    code the module is missing: no warning there)."""
    try:
        module = importlib.import_module(f"{__package__}.cpu_kernels")
    except ImportError:
        return None
    try:
        module.load()
    except module.KernelBuildError as error:
        warnings.warn(f"{error} Using the fused PyTorch operators instead.", RuntimeWarning, stacklevel=2)
        return None
    return module


def _c_calls_escape() -> bool:
    """Whether a C call would escape what runs the code, none of which can see into one: `torch.compile` (Dynamo),
    TorchScript tracing, a dispatch mode (fake tensors; `make_fx`, AOTAutograd and export tracing), functorch
    transforms (`vmap`, `grad`, `jvp`) or forward-mode AD."""
    return (
        torch.compiler.is_dynamo_compiling()
        or torch._C._is_tracing()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
        or forward_ad._current_level >= 0
    )


def _native(kernel: str, tensor: torch.Tensor, *args) -> torch.Tensor | None:
    """`cpu_kernels.<kernel>(*args)` when the C kernels are chosen and usable for `tensor`: a CPU tensor where C
    calls do not escape (`_c_calls_escape`); else None, as where the kernel does not take these inputs."""
    if _implementation != "native" or not tensor.is_cpu or torch.compiler.is_compiling() or _c_calls_escape():
        return None
    module = _native_module()
    return None if module is None else getattr(module, kernel)(*args)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, type(None))


def _decoding_extension(*tensors: torch.Tensor | None) -> ModuleType | None:
    """The C++ extension (`cpu_kernels.extension()`) for a call without autograd on `tensors` (None allowed), where
    the native kernels may run now (as `_native` checks; the extension itself declines other devices and dtypes), it
    is built, and no tensor is a subclass; else None. Decoding calls it for every sublayer and token, so it takes the
    fewest Python steps: in the model, each Python call between a sublayer and its kernel costs about a microsecond."""
    if _implementation != "native" or torch.is_grad_enabled() or torch.compiler.is_dynamo_compiling():
        return None
    if torch._C._is_tracing() or torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return None  # `_c_calls_escape` written out: one Python call fewer
    if forward_ad._current_level >= 0:
        return None
    for tensor in tensors:
        if type(tensor) not in _PLAIN_TYPES:
            return None
    module = _native_module()
    return None if module is None else module.extension()


def _triton_kernels(state: torch.Tensor, direction: torch.Tensor) -> ModuleType | None:
    """The Triton rewrite when usable (`_triton_for`) and a token's state is small enough for one program."""
    module = _triton_for(state)
    value_channels = 1 if state.dim() == direction.dim() else state.shape[-1]
    return module if module is not None and module.fits(direction.shape[-1], value_channels) else None


def _autocast_off(device: torch.device) -> AbstractContextManager:
    """For the operators that choose their own precisions (the state's dtype, float32 reads): autocast would make
    their matrix products and the expansion's convolution bfloat16 or float16 (and mismatch the in-place ones)."""
    return torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(device.type) else nullcontext()


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, e.g. for gradcheck)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)`, without the call when it is already of that dtype (a no-op `to` costs microseconds)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def unit_direction(direction: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """`k = h / sqrt(||h||^2 + eps^2)` in (at least) float32: a zero `h` gives `k = 0`, never NaN."""
    direction = _wide(direction)
    return direction * torch.rsqrt(direction.pow(2).sum(-1, keepdim=True) + eps * eps)


def _as_channels(state: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """View a scalar state `(..., d)` as `(..., d, 1)`; report whether it was scalar."""
    is_scalar = state.dim() == direction.dim()
    return (state.unsqueeze(-1) if is_scalar else state), is_scalar


def delta_update(
    state: torch.Tensor, direction: torch.Tensor, target: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """The DDL rewrite `X + beta * k (v^T - k^T X)`, with `k` the normalised `direction`.

    The reading `k^T X`, the gate and the correction are computed in float32; the state keeps its dtype.
    """
    channels, is_scalar = _as_channels(state, direction)
    k = unit_direction(direction, eps)  # (..., d)
    read = (k.unsqueeze(-1) * _wide(channels)).sum(-2)  # (..., d_v); an einsum would turn bfloat16 under autocast
    correction = _wide(beta) * (_wide(target) - read)  # (..., d_v)
    update = k.unsqueeze(-1) * correction.unsqueeze(-2)  # (..., d, d_v)
    new_state = channels + update.to(state.dtype)
    return new_state.squeeze(-1) if is_scalar else new_state


def write_only_update(
    state: torch.Tensor, direction: torch.Tensor, target: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """The control without the erase term: `X + beta * k v^T`."""
    channels, is_scalar = _as_channels(state, direction)
    k = unit_direction(direction, eps)  # (..., d)
    update = k.unsqueeze(-1) * (_wide(beta) * _wide(target)).unsqueeze(-2)  # (..., d, d_v)
    new_state = channels + update.to(state.dtype)
    return new_state.squeeze(-1) if is_scalar else new_state


def channel_mix(state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-feature mixing over the value channels: `(..., d, d_v)` with weight `(d, d_v)` -> `(..., d)`."""
    return (state * weight.to(state.dtype)).sum(-1)


def token_mix(
    states: torch.Tensor, conv_weight: torch.Tensor, read: torch.Tensor, history: torch.Tensor | None = None
) -> torch.Tensor:
    """TC: a causal depthwise convolution over tokens of every `(feature, channel)` pair, then a read over channels.

    `states` `(B, T, d, d_v)`; `conv_weight` `(d * d_v, 1, K)` (channel `i * d_v + j`); `read` `(d_v,)`; `history`
    `(B, K - 1, d, d_v)`: the states before the first one (None: zeros, the start of the sequence). Returns
    `(B, T, d)`.
    """
    batch, seq_len, hidden, value_channels = states.shape
    kernel_size = conv_weight.shape[-1]
    if history is None:
        history = states.new_zeros(batch, kernel_size - 1, hidden, value_channels)
    window = torch.cat([history, states], 1).reshape(batch, kernel_size - 1 + seq_len, hidden * value_channels)
    mixed = F.conv1d(window.transpose(1, 2), conv_weight.to(states.dtype), groups=hidden * value_channels)
    return mixed.transpose(1, 2).unflatten(-1, (hidden, value_channels)) @ read.to(states.dtype)


def expand_embeddings(window: torch.Tensor, conv_weight: torch.Tensor) -> torch.Tensor:
    """EC: a causal depthwise convolution over tokens from `d` features to `d * d_v` channels (channel `i * d_v + j`).

    `window` `(B, K - 1 + T, d)`: the `K - 1` inputs before the first token (zeros at the start), then the `T` inputs;
    `conv_weight` `(d * d_v, 1, K)`. Returns the states `(B, T, d, d_v)`."""
    hidden = window.shape[-1]
    with _autocast_off(window.device):  # the state keeps the embeddings' dtype, as in the fused expansion
        expanded = F.conv1d(window.transpose(1, 2), conv_weight.to(window.dtype), groups=hidden)  # (B, d * d_v, T)
    return expanded.transpose(1, 2).unflatten(-1, (hidden, -1))


# ---------------------------------------------------------------------------------------------------------------
# Fused operators
# ---------------------------------------------------------------------------------------------------------------


def channel_major(state: torch.Tensor) -> torch.Tensor:
    """`(..., d, d_v)` -> the `(..., d_v, d)` transposed view, contiguous (a copy only if the layout differs)."""
    return state.transpose(-1, -2).contiguous()


def _flat(state: torch.Tensor) -> torch.Tensor:
    """A channel-major `(..., d, d_v)` state as flat channels `(N, d_v, d)`."""
    return channel_major(state).view(-1, state.shape[-1], state.shape[-2])


def _empty_channel_major(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised `(..., d, d_v)` tensor with channel-major memory that is not a view (autograd can then
    accumulate into the gradients it holds in place)."""
    strides, size = [0] * len(shape), shape[-1] * shape[-2]
    strides[-2], strides[-1] = 1, shape[-2]
    for dim in range(len(shape) - 3, -1, -1):
        strides[dim] = size
        size *= shape[dim]
    return torch.empty_strided(shape, strides, dtype=like.dtype, device=like.device)


def _read(channels: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`k^T X` -> `(..., d_v)`, for a scalar state `(..., d)` or flat channels `(N, d_v, d)`."""
    if channels.dim() == k.dim():
        return torch.linalg.vecdot(channels, k).unsqueeze(-1)
    return torch.bmm(k.unsqueeze(1), channels.transpose(1, 2)).squeeze(1)


def _combine(weights: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """`X w` -> `(..., d)`: the channels weighted by `(..., d_v)` and summed."""
    if channels.dim() == weights.dim():
        return weights * channels
    return torch.bmm(weights.unsqueeze(1), channels).squeeze(1)


def _add_outer(state: torch.Tensor, channels: torch.Tensor, weights: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`X + k w^T` as a new tensor shaped like `state`, from its flat channels (channel-major for `d_v > 1`)."""
    dtype = channels.dtype
    if weights.dtype != dtype or k.dtype != dtype:
        weights, k = weights.to(dtype), k.to(dtype)
    if channels.dim() == k.dim():
        return torch.addcmul(channels, weights, k)
    out = _empty_channel_major(state.shape, channels)
    torch.addcmul(channels, weights.unsqueeze(-1), k.unsqueeze(-2), out=_flat(out))
    return out


def _combine_into(out: torch.Tensor, weights: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """`out += X w` in place (see `_combine`)."""
    if channels.dim() == weights.dim():
        return out.addcmul_(weights, channels)
    out.unsqueeze(1).baddbmm_(weights.unsqueeze(1), channels)
    return out


def _rewrite_forward(
    state: torch.Tensor, direction: torch.Tensor, target: torch.Tensor, beta: torch.Tensor, eps: float, erase: bool
) -> tuple[torch.Tensor, ...]:
    """The new state `X + h c^T`, `c = beta (v - k^T X) / sqrt(||h||^2 + eps^2)`, and what backward needs: the flat
    channels, `h`, the scale `1 / sqrt(||h||^2 + eps^2)`, `beta`, `k^T X`, the error `v - k^T X` and `c`."""
    if state.dim() == direction.dim():  # scalar state: every tensor keeps its leading shape
        channels = state
    else:
        channels, (hidden, value_channels) = _flat(state), state.shape[-2:]
        direction, target = direction.reshape(-1, hidden), target.reshape(-1, value_channels)
        beta = beta.reshape(-1, 1)
    h = _wide(direction)
    scale = torch.linalg.vecdot(h, h).unsqueeze(-1).add_(eps * eps).rsqrt_()
    read = _read(_wide(channels), h).mul_(scale) if erase else None
    error = _wide(target) - read if erase else _wide(target)
    coef = error * beta * scale
    new_state = _add_outer(state, channels, coef, direction)
    return new_state, channels, direction, scale, beta, read, error, coef


def _rewrite_without_grad(
    state: torch.Tensor, direction: torch.Tensor, target: torch.Tensor, beta: torch.Tensor, eps: float, erase: bool
) -> torch.Tensor:
    """The rewrite in as few operations as possible (decoding runs it for every token): no flattening, no saving;
    an expanded result takes the input's layout (channel-major in the model)."""
    h = _wide(direction)
    scale = (h * h).sum(-1, keepdim=True).add_(eps * eps).rsqrt_()  # (..., 1)
    scalar = state.dim() == direction.dim()
    column = h if scalar else h.unsqueeze(-1)  # (..., d) or (..., d, 1)
    if erase:  # c = beta (v - scale k^T X) scale
        read = (_wide(state) * column).sum(-1 if scalar else -2, keepdim=scalar)  # (..., 1) or (..., d_v)
        coef = torch.addcmul(target, read, scale, value=-1).mul_(beta).mul_(scale)
    else:
        coef = target * beta * scale
    coef = coef if scalar else coef.unsqueeze(-2)  # (..., 1) or (..., 1, d_v)
    return torch.addcmul(state, _cast(column, state.dtype), _cast(coef, state.dtype))


class _FusedRewrite(torch.autograd.Function):
    """The rewrite as one node. Saves the input state (only to erase), `h` and per-token scalars; also returns the
    weights `c` of `X + h c^T` (not differentiable), with which a `StateTape` can undo the rewrite. `kernels`: the
    module doing both passes, Triton's (`triton_rewrite`) or C's (`cpu_kernels`), or None for the eager code."""

    @staticmethod
    def forward(ctx, state, direction, target, beta, eps: float, erase: bool, kernels: ModuleType | None):
        ctx.erase, ctx.kernels, ctx.scalar = erase, kernels, state.dim() == direction.dim()
        ctx.inputs = [(t.shape, t.dtype) for t in (direction, target, beta)]
        if kernels is not None:
            new_state, channels, h, beta, scale, read, error, coef = kernels.rewrite_forward(
                state, direction, target, beta, eps, erase
            )
        else:
            with _autocast_off(state.device):
                new_state, channels, h, scale, beta, read, error, coef = _rewrite_forward(
                    state, direction, target, beta, eps, erase
                )
        ctx.save_for_backward(channels if erase else None, h, scale, beta, read, error)
        ctx.mark_non_differentiable(coef)
        return new_state, coef

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_coef):
        grads = None
        if ctx.kernels is not None:
            channels, h, scale, beta, read, error = ctx.saved_tensors
            grads = ctx.kernels.rewrite_backward(
                grad_out, ctx.scalar, channels, h, beta, scale, read, error, state_grad=ctx.needs_input_grad[0]
            )
        if grads is None:  # no kernels, or the C backward does not take these tensors (see its docstring)
            with _autocast_off(grad_out.device):
                grads = _rewrite_backward(grad_out, ctx.scalar, ctx.erase, ctx.needs_input_grad[0], *ctx.saved_tensors)
        grad_state, *grads = grads
        return grad_state if ctx.needs_input_grad[0] else None, *_like_inputs(grads, ctx.inputs), None, None, None


def _like_inputs(grads, inputs: list[tuple[torch.Size, torch.dtype] | None]) -> list[torch.Tensor | None]:
    """Gradients reshaped and cast as their inputs `(shape, dtype)` were; None for a missing gradient or input."""
    return [None if g is None or like is None else g.reshape(like[0]).to(like[1]) for g, like in zip(grads, inputs)]


def _rewrite_backward(grad_out, scalar, erase, state_grad, channels, h, scale, beta, read, error):
    """The rewrite's eager backward from what its forward saved: the gradients of the state, `h`, the target and the
    gate (the last three as rows)."""
    grad = grad_out if scalar else _flat(grad_out)  # an unbatched expanded state has the rows' rank
    grad_wide, h_wide = _wide(grad), _wide(h)
    k_grad = _read(grad_wide, h_wide).mul_(scale)  # k^T G, (..., d_v)
    grad_target, grad_beta = beta * k_grad, (error * k_grad).sum(-1, keepdim=True)
    # dL/dk = G (beta e) - X (beta k^T G), and dL/dh = scale (dL/dk - k k^T dL/dk)
    write_weights = beta * error
    k_dot = (write_weights * k_grad).sum(-1, keepdim=True)
    grad_direction = _combine(write_weights * scale, grad_wide)
    if erase:
        k_dot = k_dot - (grad_target * read).sum(-1, keepdim=True)
        _combine_into(grad_direction, -grad_target * scale, _wide(channels))
    grad_direction.addcmul_(h_wide, k_dot * scale.square(), value=-1)
    grad_state = grad_out
    if erase and state_grad:
        grad_state = _add_outer(grad_out, grad, -grad_target * scale, h)  # G - beta k (k^T G)
    return grad_state, grad_direction, grad_target, grad_beta


class _FusedProjectedRewrite(torch.autograd.Function):
    """The rewrite with its target `value_scale * sigmoid(W_v c + b_v)` (or `W_v c + b_v`) and gate
    `2 sigmoid(w_g c + b_g)` projected from the context `c`, as one node on the CPU. Forward is one C call (the
    projections, their activations and the rewrite); backward one C call down to the gradients of the projections'
    outputs, then two matrix products give the context's and the weights' gradients. Saves what `_FusedRewrite`
    saves, with the target in place of the error, and the context and the weights (no copies)."""

    @staticmethod
    def forward(ctx, state, direction, context, value_weight, value_bias, gate_weight, gate_bias, eps, erase, scale):
        kernels = _native_module()
        weights = (value_weight, value_bias, gate_weight, gate_bias)
        new_state, channels, h, beta, h_scale, read, target, coef = kernels.projected_rewrite_forward(
            state, direction, context, *weights, eps, erase, scale
        )
        ctx.erase, ctx.scalar, ctx.value_scale = erase, state.dim() == direction.dim(), scale
        ctx.shapes = [None if t is None else (t.shape, t.dtype) for t in (direction, context, *weights)]
        ctx.save_for_backward(channels if erase else None, h, h_scale, beta, read, target, context, *weights)
        ctx.mark_non_differentiable(coef)
        return new_state, coef

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_coef):
        channels, h, h_scale, beta, read, target, context, value_weight, _, gate_weight, _ = ctx.saved_tensors
        needs, saved = ctx.needs_input_grad, (channels, h, h_scale, beta, read, target)
        grads = _native_module().projected_rewrite_backward(grad_out, ctx.scalar, saved, ctx.value_scale, needs[0])
        if grads is None:  # the C backward does not take these tensors (see its docstring)
            grads = _projected_rewrite_backward(grad_out, ctx.scalar, ctx.erase, needs[0], saved, ctx.value_scale)
        grad_state, grad_h, grad_logits = grads  # grad_logits: (N, d_v + 1), the projections' outputs
        grad_context = grad_weights = None
        if needs[2]:
            grad_context = grad_logits @ torch.cat([value_weight, gate_weight])  # (N, d)
        if any(needs[3:7]):
            grad_weight, grad_bias = grad_logits.t() @ context.reshape(-1, context.shape[-1]), grad_logits.sum(0)
            value_channels = value_weight.shape[0]
            grad_weights = (grad_weight[:value_channels], grad_bias[:value_channels])
            grad_weights += (grad_weight[value_channels:], grad_bias[value_channels:])
        grads = (grad_h, grad_context, *(grad_weights or (None,) * 4))
        return grad_state if needs[0] else None, *_like_inputs(grads, ctx.shapes), None, None, None


def _projected_rewrite_backward(grad_out, scalar, erase, state_grad, saved, value_scale):
    """`cpu_kernels.projected_rewrite_backward` with PyTorch operators, from the saved tensors with the target in the
    error's place: the rewrite's backward (`_rewrite_backward`), then through the activations to the projections'
    outputs."""
    channels, h, scale, beta, read, target = saved
    error = target - read if erase else target  # as the forward computed it
    grad_state, grad_h, grad_target, grad_beta = _rewrite_backward(
        grad_out, scalar, erase, state_grad, channels, h, scale, beta, read, error
    )
    target = target.reshape(-1, target.shape[-1])
    grad_value = grad_target.reshape(target.shape)
    if value_scale is not None:  # d(s sigmoid(z))/dz = v (1 - v / s)
        grad_value = grad_value * target * (1 - target / value_scale)
    beta = beta.reshape(-1, 1)
    grad_gate = grad_beta.reshape(-1, 1) * beta * (1 - beta / 2)  # d(2 sigmoid(z))/dz = beta (1 - beta / 2)
    return grad_state, grad_h, torch.cat([grad_value, grad_gate], -1)


def projected_rewrite(
    state: torch.Tensor,
    direction: torch.Tensor,
    context: torch.Tensor,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    eps: float,
    erase: bool,
    value_scale: float | None,
) -> torch.Tensor | None:
    """The rewrite with its target `W_v c + b_v` (then `value_scale * sigmoid`, unless None) and gate
    `2 sigmoid(w_g c + b_g)` computed from the context `c` in the same C call (weights as `nn.Linear(d, d_v)` and
    `nn.Linear(d, 1)` hold them), or None where that does not apply: another implementation than native,
    `torch.compile` tracing, autocast, other dtypes or devices. Without autograd one call (the C++ extension's, else
    `cpu_kernels.projected_rewrite`): decoding a token costs one call per sublayer instead of about fifteen PyTorch
    operations; with autograd one node (`_FusedProjectedRewrite`), whose rewrite the state tape records."""
    if torch.is_autocast_enabled("cpu"):  # autocast would make the projections bfloat16
        return None
    weights = (value_weight, value_bias, gate_weight, gate_bias)
    cpp = _decoding_extension(state, direction, context, *weights)
    if cpp is not None:  # decoding: straight to the C++ call (None where it declines the inputs)
        new_state = cpp.projected_rewrite(state, direction, context, *weights, eps, erase, value_scale)
        if new_state is not None:
            return new_state
    if not _needs_grad(state, direction, context, *(weight for weight in weights if weight is not None)):
        return _native("projected_rewrite", state, state, direction, context, *weights, eps, erase, value_scale)
    if not _native("takes_projected_rewrite", state, state, direction, context, *weights):
        return None
    new_state, coef = _FusedProjectedRewrite.apply(state, direction, context, *weights, eps, erase, value_scale)
    record_rewrite(new_state, state, direction, coef.view(*direction.shape[:-1], coef.shape[-1]))
    return new_state


def _needs_grad(*items: torch.Tensor | torch.nn.Module) -> bool:
    """Whether autograd is on and any tensor, or any parameter of a module, requires a gradient."""
    if not torch.is_grad_enabled():
        return False
    tensors = (p for item in items for p in (item.parameters() if isinstance(item, torch.nn.Module) else (item,)))
    return any(t.requires_grad for t in tensors)


def _fused_rewrite(
    state: torch.Tensor, direction: torch.Tensor, target: torch.Tensor, beta: torch.Tensor, eps: float, erase: bool
) -> torch.Tensor:
    lead = direction.shape[:-1]
    value_channels = 1 if state.dim() == direction.dim() else state.shape[-1]
    if state.shape[: len(lead)] != lead or target.shape != (*lead, value_channels) or beta.shape != (*lead, 1):
        reference = delta_update if erase else write_only_update
        return reference(state, direction, target, beta, eps)  # broadcasting shapes: rare, not worth a kernel
    needs_grad = state.requires_grad or direction.requires_grad or target.requires_grad or beta.requires_grad
    kernels, beta = _triton_kernels(state, direction), _wide(beta)
    # decoding: the shortest path (autocast changes none of its dtypes)
    if not (needs_grad and torch.is_grad_enabled()):
        if kernels is not None:
            return kernels.rewrite_forward(state, direction, target, beta, eps, erase, save=False)[0]
        new_state = _native("rewrite", state, state, direction, target, beta, eps, erase)
        if new_state is not None:
            return new_state
        return _rewrite_without_grad(state, direction, target, beta, eps, erase)
    if kernels is None and _native("takes_rewrite", state, state, direction, target, beta):
        kernels = _native_module()  # training on the CPU: the C forward and backward
    new_state, coef = _FusedRewrite.apply(state, direction, target, beta, eps, erase, kernels)
    record_rewrite(new_state, state, direction, coef.view(*lead, coef.shape[-1]))  # -1: ambiguous if empty
    return new_state


def fused_delta_update(
    state: torch.Tensor, direction: torch.Tensor, target: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """`delta_update` as one autograd function; an expanded result is channel-major in memory."""
    return _fused_rewrite(state, direction, target, beta, eps, erase=True)


def fused_write_only_update(
    state: torch.Tensor, direction: torch.Tensor, target: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """`write_only_update` as one autograd function; an expanded result is channel-major in memory."""
    return _fused_rewrite(state, direction, target, beta, eps, erase=False)


def _mix_channels(state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`sum_j w[:, j] X[..., :, j]`: one pass over the state in any layout, no copy."""
    mixed = state[..., 0] * weight[:, 0]
    for j in range(1, state.shape[-1]):
        mixed = mixed.addcmul_(state[..., j], weight[:, j])
    return mixed


class _FusedChannelMix(torch.autograd.Function):
    """`channel_mix` as one node; its state gradient is channel-major, like the rewrite's, so the two add in place."""

    @staticmethod
    def forward(ctx, state, weight):
        ctx.save_for_backward(state, weight)
        mixed = _native("channel_mix", state, state, weight)
        return mixed if mixed is not None else _mix_channels(state, weight.to(state.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        state, weight = ctx.saved_tensors
        grads = _native("channel_mix_backward", state, grad_out, state, weight, *ctx.needs_input_grad)
        if grads is not None:
            return grads
        grad_state = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_state = _empty_channel_major(state.shape, grad_out)
            weight_rows = weight.t().contiguous().to(grad_out.dtype)  # (d_v, d)
            torch.mul(grad_out.unsqueeze(-2), weight_rows, out=grad_state.transpose(-1, -2))
        if ctx.needs_input_grad[1]:
            grad = grad_out.reshape(-1, state.shape[-2])
            columns = [(grad * state[..., j].reshape(grad.shape)).sum(0) for j in range(state.shape[-1])]
            grad_weight = torch.stack(columns, -1).to(weight.dtype)
        return grad_state, grad_weight


def fused_channel_mix(state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`channel_mix` without temporaries, and with a channel-major gradient. A few tokens (decoding) take one `vecdot`
    instead: there, every extra operation costs more than the pass over the state."""
    cpp = _decoding_extension(state, weight)
    if cpp is not None:  # decoding: straight to the C++ call (None where it declines the inputs)
        mixed = cpp.channel_mix(state, weight)
        if mixed is not None:
            return mixed
    if torch.is_grad_enabled() and (state.requires_grad or weight.requires_grad):
        return _FusedChannelMix.apply(state, weight)
    mixed = _native("channel_mix", state, state, weight)
    if mixed is not None:
        return mixed
    weight = _cast(weight, state.dtype)
    if state.numel() > 64 * weight.numel():
        return _mix_channels(state, weight)
    with _autocast_off(state.device):  # as the other paths: the state's dtype, not autocast's
        return torch.linalg.vecdot(state, weight)


def _token_conv(window: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """The depthwise 2-D convolution of `fused_token_mix`: the channel-major window `(B, L, d_v, d)` is, in
    channels-last memory, an image of `d` channels and size `L x d_v`; `weight` `(K, d_v, d)` is a `K x d_v` kernel
    per feature. `padding` zero tokens go before the window (and, unused, after it). Returns `(B, L + padding - K + 1,
    d)`."""
    hidden, seq_len = window.shape[-1], window.shape[1] + padding - weight.shape[0] + 1
    mixed = F.conv2d(*_conv_operands(window, weight), padding=(padding, 0), groups=hidden)  # (B, d, L', 1)
    return mixed[:, :, :seq_len, 0].transpose(1, 2)  # (B, T, d)


def _conv_operands(window: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The window as a channels-last image `(B, d, L, d_v)` and the kernel as `(d, 1, K, d_v)`, both views."""
    return window.permute(0, 3, 1, 2), weight.permute(2, 0, 1).unsqueeze(1)


def _conv_dtype(window: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of `window` returns: autocast's where it is on, else the window's."""
    device = window.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else window.dtype


class _FusedTokenConv(torch.autograd.Function):
    """`_token_conv` with a faster kernel gradient on the CPU: one token-axis dot product per tap instead of the
    convolution's own weight gradient (several times slower there). The window's gradient is the convolution's.
    The forward runs under autocast like any convolution; the backward runs in the inputs' dtypes (the kernel's
    gradient in float32 at least). `kernels`: the Triton module doing all of it (a float32 sum in the output dtype
    a convolution would have), or None. With the native implementation, float32 CPU tensors take one C call each way
    (`cpu_kernels.token_conv_forward` and `_backward`) instead."""

    @staticmethod
    def forward(ctx, window, weight, padding: int, kernels: ModuleType | None):
        ctx.save_for_backward(window, weight)
        ctx.padding, ctx.kernels = padding, kernels
        if kernels is not None:
            return kernels.token_conv_forward(window, weight, padding, _conv_dtype(window))
        if not torch.is_autocast_enabled("cpu"):
            mixed = _native("token_conv_forward", window, window, weight, padding)
            if mixed is not None:
                return mixed
        return _token_conv(window, weight, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        window, weight = ctx.saved_tensors
        grad_window = grad_weight = None
        if ctx.kernels is not None:
            grad_window, grad_weight = ctx.kernels.token_conv_backward(
                grad_out, window, weight, ctx.padding, ctx.needs_input_grad[:2]
            )
            return grad_window, None if grad_weight is None else grad_weight.to(weight.dtype), None, None
        grads = _native(
            "token_conv_backward", window, grad_out, window, weight, ctx.padding, *ctx.needs_input_grad[:2]
        )
        if grads is not None:
            return *grads, None, None
        with _autocast_off(grad_out.device):
            if ctx.needs_input_grad[0]:
                grad = grad_out.to(window.dtype)  # differs under autocast (a bfloat16 output of float32 inputs)
                grad_window = _token_conv_input_grad(grad, window, weight, ctx.padding)
            if ctx.needs_input_grad[1]:
                taps = _tap_gradients(grad_out.unsqueeze(2), window, weight.shape[0], ctx.padding)  # (K, d_v, d)
                grad_weight = taps.to(weight.dtype)
        return grad_window, grad_weight, None, None


def _token_conv_input_grad(grad_out: torch.Tensor, window: torch.Tensor, weight: torch.Tensor, padding: int):
    """The window's gradient `(B, L, d_v, d)` from the convolution's backward (its output grows by the unused
    trailing padding, which gets a zero gradient)."""
    batch, seq_len, hidden = grad_out.shape
    kernel_size = weight.shape[0]
    out_len = window.shape[1] + 2 * padding - kernel_size + 1
    grad_image = grad_out.new_zeros(batch, out_len, 1, hidden).permute(0, 3, 1, 2)  # (B, d, L', 1), channels-last
    grad_image[:, :, :seq_len, 0] = grad_out.transpose(1, 2)
    image, kernel = _conv_operands(window, weight)
    grad_window = torch.ops.aten.convolution_backward(  # stride, padding, dilation, ..., groups, output_mask
        grad_image, image, kernel, None, [1, 1], [padding, 0], [1, 1], False, [0, 0], hidden, [True, False, False]
    )[0]
    return grad_window.permute(0, 2, 3, 1)  # (B, L, d_v, d)


def _tap_gradients(grad: torch.Tensor, window: torch.Tensor, kernel_size: int, padding: int) -> torch.Tensor:
    """The kernel gradient `(K, ...)` of a convolution along tokens whose output `t` reads window position
    `t + k - padding` with tap `k`: `sum over the batch and t of grad[t] * window[t + k - padding]`, in float32 at
    least. `grad` `(B, T, ...)` and `window` `(B, L, ...)` broadcast in their trailing dimensions."""
    grad, window = _wide(grad), _wide(window)
    seq_len, window_len = grad.shape[1], window.shape[1]
    taps = []
    with _autocast_off(grad.device):  # vecdot is a matrix product to autocast
        for tap in range(kernel_size):
            shift = tap - padding
            first = max(0, -shift)
            last = max(first, min(seq_len, window_len - shift))  # outputs [first, last) read positions in the window
            products = torch.linalg.vecdot(grad[:, first:last], window[:, first + shift : last + shift], dim=1)
            taps.append(products.sum(0))
    return torch.stack(taps)


def fused_token_mix(
    states: torch.Tensor, conv_weight: torch.Tensor, read: torch.Tensor, history: torch.Tensor | None = None
) -> torch.Tensor:
    """`token_mix` as one depthwise convolution with the read folded into its `K x d_v` kernel per feature (see
    `_token_conv`); causal zero padding is the convolution's own. On the CPU, training takes `_FusedTokenConv` (C
    calls with the native implementation); with the Triton implementation, the convolution and its backward are
    Triton kernels. One decoded token is a single multiply-and-sum over its window instead."""
    one_token = history is not None and states.shape[1] == 1
    cpp = _decoding_extension(states, conv_weight, read, history) if one_token else None
    if cpp is not None:  # decoding: straight to the C++ call (None where it declines the inputs)
        mixed = cpp.token_mix_step(states, conv_weight, read, history)
        if mixed is not None:
            return mixed
    if one_token and not _needs_grad(states, conv_weight, read, history):
        mixed = _native("token_mix_step", states, states, conv_weight, read, history)  # decoding: one call
        if mixed is not None:
            return mixed
    kernel_size, hidden, value_channels = conv_weight.shape[-1], states.shape[-2], states.shape[-1]
    weight = conv_weight.view(hidden, value_channels, kernel_size).permute(2, 1, 0) * read.unsqueeze(-1)  # (K, d_v, d)
    weight = weight.to(states.dtype)
    window = channel_major(states)  # (B, T, d_v, d)
    padding = kernel_size - 1
    if history is not None:
        window, padding = torch.cat([channel_major(history), window], 1), 0
        if states.shape[1] == 1:
            return (window * weight).sum((1, 2)).unsqueeze(1)
    needs_grad = torch.is_grad_enabled() and (window.requires_grad or weight.requires_grad)
    kernels = _triton_for(window)
    if needs_grad and (kernels is not None or (window.device.type == "cpu" and not torch.compiler.is_compiling())):
        return _FusedTokenConv.apply(window, weight, padding, kernels)
    if kernels is not None:
        return kernels.token_conv_forward(window, weight, padding, _conv_dtype(window))
    return _token_conv(window, weight, padding)


def _expansion_taps(conv_weight: torch.Tensor, hidden: int) -> torch.Tensor:
    """The EC convolution weight `(d * d_v, 1, K)` as contiguous taps `(K, d_v, d)`."""
    return conv_weight.view(hidden, -1, conv_weight.shape[-1]).permute(2, 1, 0).contiguous()


def _taps_as_weight(taps: torch.Tensor) -> torch.Tensor:
    """Taps `(K, d_v, d)` as the EC convolution weight `(d * d_v, 1, K)` (`_expansion_taps` undone)."""
    kernel_size, value_channels, hidden = taps.shape
    return taps.permute(2, 1, 0).reshape(hidden * value_channels, 1, kernel_size)


def _expand(window: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """`sum_tap window[:, tap : tap + T, :] * taps[tap]` into a new channel-major state `(B, T, d, d_v)`."""
    batch, length, hidden = window.shape
    kernel_size, value_channels = taps.shape[:2]
    seq_len = length - kernel_size + 1
    out = _empty_channel_major(torch.Size((batch, seq_len, hidden, value_channels)), window)
    channels = out.transpose(-1, -2)  # (B, T, d_v, d), contiguous
    torch.mul(window[:, :seq_len, None, :], taps[0], out=channels)
    for tap in range(1, kernel_size):
        channels.addcmul_(window[:, tap : tap + seq_len, None, :], taps[tap])
    return out


class _FusedExpansion(torch.autograd.Function):
    """EC as `K` multiply-adds into a channel-major state (one per tap), with a matching backward; with the native
    implementation, float32 CPU tensors take one C call each way (`cpu_kernels.expansion_forward` and `_backward`)."""

    @staticmethod
    def forward(ctx, window, conv_weight):
        taps = _expansion_taps(conv_weight, window.shape[-1]).to(window.dtype)  # (K, d_v, d)
        ctx.save_for_backward(window, taps)
        ctx.weight_dtype = conv_weight.dtype
        expanded = _native("expansion_forward", window, window, taps)
        return expanded if expanded is not None else _expand(window, taps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        window, taps = ctx.saved_tensors
        grads = _native("expansion_backward", window, grad_out, window, taps, *ctx.needs_input_grad)
        if grads is not None:
            grad_window, grad_taps = grads
            return grad_window, None if grad_taps is None else _taps_as_weight(grad_taps).to(ctx.weight_dtype)
        kernel_size, value_channels = taps.shape[:2]
        grad = channel_major(grad_out).to(window.dtype)  # (B, T, d_v, d)
        seq_len = grad.shape[1]
        grad_window = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_window = torch.zeros_like(window)
            for tap in range(kernel_size):
                inputs = grad_window[:, tap : tap + seq_len]
                for channel in range(value_channels):
                    inputs.addcmul_(grad[:, :, channel], taps[tap, channel])
        if ctx.needs_input_grad[1]:
            grad_taps = _tap_gradients(grad, window.unsqueeze(2), kernel_size, padding=0)  # (K, d_v, d)
            grad_weight = _taps_as_weight(grad_taps).to(ctx.weight_dtype)
        return grad_window, grad_weight


def fused_expand_embeddings(window: torch.Tensor, conv_weight: torch.Tensor) -> torch.Tensor:
    """`expand_embeddings` as one autograd function of `K` multiply-adds; the result is channel-major. One decoded token
    is a single multiply and sum over its window (which may be a view of the cache's, time last)."""
    cpp = _decoding_extension(window, conv_weight)
    if cpp is not None and window.dim() == 3 and window.shape[1] == conv_weight.shape[-1]:  # decoding: one C++ call
        expanded = cpp.expansion_step(window, conv_weight)
        if expanded is not None:
            return expanded
    if torch.is_grad_enabled() and (window.requires_grad or conv_weight.requires_grad):
        return _FusedExpansion.apply(window, conv_weight)
    hidden, kernel_size = window.shape[-1], conv_weight.shape[-1]
    if window.shape[1] == kernel_size:  # one token (decoding): one multiply and sum over its window
        expanded = _native("expansion_step", window, window, conv_weight)
        if expanded is not None:
            return expanded
        taps = _cast(conv_weight, window.dtype).view(hidden, -1, kernel_size).permute(2, 1, 0)  # (K, d_v, d)
        return (window.unsqueeze(-2) * taps).sum(1).unsqueeze(1).transpose(-1, -2)  # channel-major (B, 1, d, d_v)
    return _expand(window, _cast(_expansion_taps(conv_weight, hidden), window.dtype))


# ---------------------------------------------------------------------------------------------------------------
# The one place that chooses
# ---------------------------------------------------------------------------------------------------------------

_REWRITES = {
    "fused": {"delta": fused_delta_update, "write_only": fused_write_only_update},
    "native": {"delta": fused_delta_update, "write_only": fused_write_only_update},  # they choose the kernels
    "triton": {"delta": fused_delta_update, "write_only": fused_write_only_update},  # they choose the kernels
    "reference": {"delta": delta_update, "write_only": write_only_update},
}


def rewrite_function(mode: str) -> Callable[..., torch.Tensor]:
    """The rewrite operator of a residual mode (`"delta"` or `"write_only"`) in the chosen implementation."""
    return _REWRITES[_implementation][mode]


def channel_mix_function() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The CC mixing (also the final readout) in the chosen implementation."""
    return fused_channel_mix if _implementation != "reference" else channel_mix


def expansion_function() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """EC in the chosen implementation."""
    return fused_expand_embeddings if _implementation != "reference" else expand_embeddings


def token_mix_function() -> Callable[..., torch.Tensor]:
    """The TC mixing in the chosen implementation."""
    return fused_token_mix if _implementation != "reference" else token_mix


__all__ = [
    "DEFAULT_IMPLEMENTATION",
    "IMPLEMENTATIONS",
    "channel_major",
    "channel_mix",
    "channel_mix_function",
    "delta_update",
    "expand_embeddings",
    "expansion_function",
    "fused_expand_embeddings",
    "fused_channel_mix",
    "fused_delta_update",
    "fused_token_mix",
    "fused_write_only_update",
    "get_implementation",
    "projected_rewrite",
    "rewrite_function",
    "set_implementation",
    "token_mix",
    "token_mix_function",
    "unit_direction",
    "write_only_update",
]
