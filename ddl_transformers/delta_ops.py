"""The DDL residual operators: the delta rewrite and its write-only control, as pure tensor functions.

Shapes: the state is `(..., d)` (scalar state, `d_v = 1`) or `(..., d, d_v)`; the direction `(..., d)`; the target
`(..., d_v)` (`(..., 1)` for a scalar state); the gate `(..., 1)`.
"""

import torch


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, e.g. for gradcheck)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


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
    read = torch.einsum("...d,...dv->...v", k, _wide(channels))  # (..., d_v)
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


__all__ = ["delta_update", "unit_direction", "write_only_update"]
