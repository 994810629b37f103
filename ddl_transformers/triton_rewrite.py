"""The fused DDL rewrite as two Triton kernels (forward, backward): one program per token, one launch per call; and
TC's token convolution as three (forward, the window's gradient, the kernel's gradient).

Chosen by `delta_ops.set_implementation("triton")` for CUDA tensors (other devices keep the eager fused operators).
The math and what is saved are those of `delta_ops._FusedRewrite`: for a token with state `X` (`d_v` channels of
`d`), sublayer output `h`, target `v` and gate `beta`, `s = 1 / sqrt(||h||^2 + eps^2)`, `read = s h^T X`,
`c = beta (v - read) s` and `X' = X + h c^T`. States are channel-major `(N, d_v, d)` rows (`d_v = 1` for the scalar
state); the arithmetic is float32 whatever the storage dtype. The token convolution is `delta_ops._token_conv`:
output `t` of feature `i` is `sum over taps k and channels j of window[t + k - padding, j, i] * weight[k, j, i]`.
Not part of the remote code: Triton is optional. With `TRITON_INTERPRET=1` set before Triton is first imported, the
kernels run on CPU tensors (the tests use that).
"""

import os
from contextlib import AbstractContextManager, nullcontext

import torch
import triton
import triton.language as tl

from .delta_ops import _empty_channel_major, _flat

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _rewrite_forward_kernel(
    state_ptr, h_ptr, target_ptr, beta_ptr, out_ptr, scale_ptr, read_ptr, error_ptr, coef_ptr,
    hidden, value_channels, eps,
    ERASE: tl.constexpr, SAVE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    v = tl.arange(0, BLOCK_V)
    d_in, v_in = d < hidden, v < value_channels
    tile = row * value_channels * hidden + v[:, None] * hidden + d[None, :]  # (BLOCK_V, BLOCK_D)
    tile_in = v_in[:, None] & d_in[None, :]
    h = tl.load(h_ptr + row * hidden + d, mask=d_in, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + row * value_channels + v, mask=v_in, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + row).to(tl.float32)
    state = tl.load(state_ptr + tile, mask=tile_in, other=0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) + eps * eps)
    if ERASE:
        read = tl.sum(state * h[None, :], axis=1) * scale  # (BLOCK_V,)
        error = target - read
        if SAVE:
            tl.store(read_ptr + row * value_channels + v, read, mask=v_in)
    else:
        error = target
    coef = beta * error * scale
    new_state = state + coef[:, None] * h[None, :]
    tl.store(out_ptr + tile, new_state.to(out_ptr.dtype.element_ty), mask=tile_in)
    if SAVE:  # what backward and the state tape need
        tl.store(scale_ptr + row, scale)
        tl.store(error_ptr + row * value_channels + v, error, mask=v_in)
        tl.store(coef_ptr + row * value_channels + v, coef, mask=v_in)


@triton.jit
def _rewrite_backward_kernel(
    grad_ptr, state_ptr, h_ptr, scale_ptr, beta_ptr, read_ptr, error_ptr,
    grad_state_ptr, grad_h_ptr, grad_target_ptr, grad_beta_ptr,
    hidden, value_channels,
    ERASE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    v = tl.arange(0, BLOCK_V)
    d_in, v_in = d < hidden, v < value_channels
    tile = row * value_channels * hidden + v[:, None] * hidden + d[None, :]
    tile_in = v_in[:, None] & d_in[None, :]
    grad = tl.load(grad_ptr + tile, mask=tile_in, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + row * hidden + d, mask=d_in, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + row)
    beta = tl.load(beta_ptr + row).to(tl.float32)
    error = tl.load(error_ptr + row * value_channels + v, mask=v_in, other=0.0)
    k_grad = tl.sum(grad * h[None, :], axis=1) * scale  # k^T G, (BLOCK_V,)
    grad_target = beta * k_grad
    write_weights = beta * error
    k_dot = tl.sum(write_weights * k_grad, axis=0)
    grad_h = tl.sum(write_weights[:, None] * grad, axis=0) * scale
    if ERASE:
        read = tl.load(read_ptr + row * value_channels + v, mask=v_in, other=0.0)
        state = tl.load(state_ptr + tile, mask=tile_in, other=0.0).to(tl.float32)
        k_dot -= tl.sum(grad_target * read, axis=0)
        grad_h -= tl.sum(grad_target[:, None] * state, axis=0) * scale
        grad_state = grad - (grad_target * scale)[:, None] * h[None, :]  # G - beta k (k^T G)
        tl.store(grad_state_ptr + tile, grad_state.to(grad_state_ptr.dtype.element_ty), mask=tile_in)
    grad_h -= h * (k_dot * scale * scale)
    tl.store(grad_h_ptr + row * hidden + d, grad_h, mask=d_in)
    tl.store(grad_target_ptr + row * value_channels + v, grad_target, mask=v_in)
    tl.store(grad_beta_ptr + row, tl.sum(error * k_grad, axis=0))


MAX_BLOCK = 1 << 16  # a token's padded state, in elements, that one program holds in registers (Triton's cap: 2^20)


def fits(hidden: int, value_channels: int) -> bool:
    """Whether a token's state `(d_v, d)` fits one program (larger ones keep the eager operators)."""
    return 0 < triton.next_power_of_2(hidden) * triton.next_power_of_2(value_channels) <= MAX_BLOCK


def _launch_shape(hidden: int, value_channels: int) -> dict[str, int]:
    """Blocks that hold a token's whole state, and enough warps to keep it in registers."""
    block_d, block_v = triton.next_power_of_2(hidden), triton.next_power_of_2(value_channels)
    return {"BLOCK_D": block_d, "BLOCK_V": block_v, "num_warps": min(16, max(4, block_d * block_v // 1024))}


def _on_device(tensor: torch.Tensor) -> AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one (e.g. a model on `cuda:1`)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def _as_rows(state: torch.Tensor, scalar: bool) -> torch.Tensor:
    """A scalar `(..., d)` or expanded `(..., d, d_v)` state as contiguous channel-major rows `(N, d_v, d)`."""
    return state.reshape(-1, 1, state.shape[-1]).contiguous() if scalar else _flat(state)


def _like(state: torch.Tensor, scalar: bool) -> torch.Tensor:
    """A new tensor shaped like `state`: contiguous (scalar) or channel-major (expanded)."""
    return (
        torch.empty(state.shape, dtype=state.dtype, device=state.device)
        if scalar
        else _empty_channel_major(state.shape, state)
    )


def rewrite_forward(
    state: torch.Tensor,
    direction: torch.Tensor,
    target: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    erase: bool,
    save: bool = True,
) -> tuple[torch.Tensor, ...]:
    """`_rewrite_forward` of `delta_ops` in one launch: the new state (channel-major if expanded) and what backward
    needs: the rows of the input state, `h`, `beta`, and the float32 per-token `scale`, `read` (None without the
    erase term), `error` and `coef`, all as rows. `save=False` (decoding) writes the new state only; the rest is
    then None."""
    scalar = state.dim() == direction.dim()
    channels = _as_rows(state, scalar)
    rows, value_channels, hidden = channels.shape
    h = direction.reshape(rows, hidden).contiguous()
    target = target.reshape(rows, value_channels).contiguous()
    beta = beta.reshape(rows, 1).contiguous()
    new_state = _like(state, scalar)
    out = _as_rows(new_state, scalar)
    scale = read = error = coef = None
    if save:
        scale = torch.empty(rows, 1, device=state.device, dtype=torch.float32)
        error, coef = (torch.empty(rows, value_channels, device=state.device, dtype=torch.float32) for _ in range(2))
        read = torch.empty_like(error) if erase else None
    if rows:
        with _on_device(state):
            _rewrite_forward_kernel[(rows,)](
                channels, h, target, beta, out, *(out if t is None else t for t in (scale, read, error, coef)),
                hidden, value_channels, eps, ERASE=erase, SAVE=save, **_launch_shape(hidden, value_channels),
            )  # fmt: skip
    return new_state, channels, h, beta, scale, read, error, coef


def rewrite_backward(
    grad_out: torch.Tensor, scalar: bool, channels: torch.Tensor | None, h: torch.Tensor, beta: torch.Tensor,
    scale: torch.Tensor, read: torch.Tensor | None, error: torch.Tensor, state_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradient of the state (`grad_out` itself without the erase term, i.e. when `channels`, the input state's
    rows, is None), and float32 ones of `h` `(N, d)`, the target `(N, d_v)` and the gate `(N, 1)`. The state's
    gradient is made even when `state_grad` is False (the C kernels' interface skips it then)."""
    grad = _as_rows(grad_out, scalar)
    rows, value_channels, hidden = grad.shape
    erase = channels is not None
    grad_state = _like(grad_out, scalar) if erase else grad_out
    grad_h = torch.empty(rows, hidden, device=h.device, dtype=torch.float32)
    grad_target = torch.empty(rows, value_channels, device=h.device, dtype=torch.float32)
    grad_beta = torch.empty(rows, 1, device=h.device, dtype=torch.float32)
    if rows:
        with _on_device(grad):
            _rewrite_backward_kernel[(rows,)](
                grad, channels if erase else grad, h, scale, beta, error if read is None else read, error,
                _as_rows(grad_state, scalar) if erase else grad, grad_h, grad_target, grad_beta,
                hidden, value_channels, ERASE=erase, **_launch_shape(hidden, value_channels),
            )  # fmt: skip
    return grad_state, grad_h, grad_target, grad_beta


@triton.jit
def _token_conv_forward_kernel(
    window_ptr, weight_ptr, out_ptr,
    window_len, seq_len, hidden, padding,
    KERNEL: tl.constexpr, CHANNELS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < hidden
    mixed = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for tap in tl.static_range(KERNEL):
        position = t + tap - padding  # the window position that output t reads with this tap
        rows = (batch * window_len + position) * CHANNELS
        tile_in = ((position >= 0) & (position < window_len) & (t < seq_len))[:, None] & d_in[None, :]
        for channel in tl.static_range(CHANNELS):
            weight = tl.load(weight_ptr + (tap * CHANNELS + channel) * hidden + d, mask=d_in, other=0.0)
            window = tl.load(window_ptr + (rows + channel)[:, None] * hidden + d[None, :], mask=tile_in, other=0.0)
            mixed += window.to(tl.float32) * weight.to(tl.float32)[None, :]
    out_in = (t < seq_len)[:, None] & d_in[None, :]
    tl.store(
        out_ptr + (batch * seq_len + t)[:, None] * hidden + d[None, :], mixed.to(out_ptr.dtype.element_ty), out_in
    )


@triton.jit
def _token_conv_window_grad_kernel(
    grad_ptr, weight_ptr, grad_window_ptr,
    window_len, seq_len, hidden, padding,
    KERNEL: tl.constexpr, CHANNELS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(0).to(tl.int64)
    position = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # window positions
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < hidden
    for channel in tl.static_range(CHANNELS):
        grad_window = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for tap in tl.static_range(KERNEL):
            t = position - tap + padding  # the output that reads this position with this tap
            tile_in = ((t >= 0) & (t < seq_len))[:, None] & d_in[None, :]
            grad = tl.load(grad_ptr + (batch * seq_len + t)[:, None] * hidden + d[None, :], mask=tile_in, other=0.0)
            weight = tl.load(weight_ptr + (tap * CHANNELS + channel) * hidden + d, mask=d_in, other=0.0)
            grad_window += grad.to(tl.float32) * weight.to(tl.float32)[None, :]
        rows = (batch * window_len + position) * CHANNELS + channel
        tl.store(
            grad_window_ptr + rows[:, None] * hidden + d[None, :],
            grad_window.to(grad_window_ptr.dtype.element_ty),
            (position < window_len)[:, None] & d_in[None, :],
        )


@triton.jit
def _token_conv_weight_grad_kernel(
    grad_ptr, window_ptr, partial_ptr,
    window_len, seq_len, hidden, padding,
    KERNEL: tl.constexpr, CHANNELS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(0).to(tl.int64)
    block = batch * tl.num_programs(1) + tl.program_id(1)  # this program's row of partial sums
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < hidden
    grad_in = (t < seq_len)[:, None] & d_in[None, :]
    grad = tl.load(grad_ptr + (batch * seq_len + t)[:, None] * hidden + d[None, :], mask=grad_in, other=0.0)
    grad = grad.to(tl.float32)
    for tap in tl.static_range(KERNEL):
        position = t + tap - padding
        rows = (batch * window_len + position) * CHANNELS
        tile_in = grad_in & ((position >= 0) & (position < window_len))[:, None]
        for channel in tl.static_range(CHANNELS):
            window = tl.load(window_ptr + (rows + channel)[:, None] * hidden + d[None, :], mask=tile_in, other=0.0)
            partial = tl.sum(grad * window.to(tl.float32), axis=0)  # (BLOCK_D,)
            tl.store(partial_ptr + ((block * KERNEL + tap) * CHANNELS + channel) * hidden + d, partial, mask=d_in)


def _conv_launch(batch: int, length: int, hidden: int) -> tuple[tuple[int, int, int], dict[str, int]]:
    """The grid over (batch, blocks of `length` tokens, blocks of features) and the block sizes."""
    block_t, block_d = 32, min(128, triton.next_power_of_2(hidden))
    grid = (batch, triton.cdiv(length, block_t), triton.cdiv(hidden, block_d))
    return grid, {"BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": 4}


def token_conv_forward(
    window: torch.Tensor, weight: torch.Tensor, padding: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """`delta_ops._token_conv` in one launch, accumulated in float32: the channel-major window `(B, L, d_v, d)` and
    taps `weight` `(K, d_v, d)` give `(B, T, d)` in `out_dtype`, `T = L + padding - K + 1` (`padding` zero tokens
    before the window)."""
    window, weight = window.contiguous(), weight.contiguous()
    batch, window_len, channels, hidden = window.shape
    kernel_size = weight.shape[0]
    seq_len = window_len + padding - kernel_size + 1
    out = torch.empty(batch, seq_len, hidden, device=window.device, dtype=out_dtype)
    if out.numel():
        grid, blocks = _conv_launch(batch, seq_len, hidden)
        with _on_device(window):
            _token_conv_forward_kernel[grid](
                window, weight, out, window_len, seq_len, hidden, padding,
                KERNEL=kernel_size, CHANNELS=channels, **blocks,
            )  # fmt: skip
    return out


def token_conv_backward(
    grad_out: torch.Tensor, window: torch.Tensor, weight: torch.Tensor, padding: int, needs_grad: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of `token_conv_forward`'s window (in its dtype, contiguous) and taps (float32), each None where
    `needs_grad` says so; the taps' gradient sums float32 partial sums, one per block of 32 tokens (every element of
    the buffer is written: `K / 32` of a float32 window)."""
    grad_out, window, weight = grad_out.contiguous(), window.contiguous(), weight.contiguous()
    batch, window_len, channels, hidden = window.shape
    kernel_size, seq_len = weight.shape[0], grad_out.shape[1]
    grad_window = grad_weight = None
    scalars = (window_len, seq_len, hidden, padding)
    with _on_device(window):
        if needs_grad[0]:
            grad_window = torch.empty_like(window)
            if window.numel():
                grid, blocks = _conv_launch(batch, window_len, hidden)
                _token_conv_window_grad_kernel[grid](
                    grad_out, weight, grad_window, *scalars, KERNEL=kernel_size, CHANNELS=channels, **blocks
                )
        if needs_grad[1]:
            grid, blocks = _conv_launch(batch, seq_len, hidden)
            partial = torch.empty(grid[0] * grid[1], kernel_size, channels, hidden, device=window.device)
            if grad_out.numel():
                _token_conv_weight_grad_kernel[grid](
                    grad_out, window, partial, *scalars, KERNEL=kernel_size, CHANNELS=channels, **blocks
                )
            grad_weight = partial.sum(0)
    return grad_window, grad_weight
