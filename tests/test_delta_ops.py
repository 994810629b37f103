"""The algebra of the DDL rewrite (DESIGN.md section 2) on the pure operator."""

import pytest
import torch

from ddl_transformers import delta_update, write_only_update
from ddl_transformers.delta_ops import unit_direction

D, DV = 16, 4


def random_inputs(batch=(3, 5), value_channels=DV, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state_shape = (*batch, D) if value_channels == 1 else (*batch, D, value_channels)
    state = torch.randn(state_shape, generator=generator, dtype=dtype)
    direction = torch.randn(*batch, D, generator=generator, dtype=dtype)
    target = torch.randn(*batch, value_channels, generator=generator, dtype=dtype)
    beta = 2 * torch.rand(*batch, 1, generator=generator, dtype=dtype)
    return state, direction, target, beta


def reading(state, direction):
    k = unit_direction(direction).double()
    channels = state.unsqueeze(-1) if state.dim() == direction.dim() else state
    return torch.einsum("...d,...dv->...v", k, channels.double())


@pytest.mark.parametrize("value_channels", [1, DV])
def test_zero_gate_is_identity(value_channels):
    state, direction, target, beta = random_inputs(value_channels=value_channels)
    out = delta_update(state, direction, target, torch.zeros_like(beta))
    torch.testing.assert_close(out, state, rtol=0, atol=0)
    assert out.shape == state.shape


@pytest.mark.parametrize("value_channels", [1, DV])
def test_unit_gate_overwrites_the_reading_with_the_target(value_channels):
    state, direction, target, beta = random_inputs(value_channels=value_channels)
    out = delta_update(state, direction, target, torch.ones_like(beta))
    torch.testing.assert_close(reading(out, direction), target.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value_channels", [1, DV])
def test_error_contracts_by_one_minus_beta(value_channels):
    state, direction, target, beta = random_inputs(value_channels=value_channels)
    error_before = reading(state, direction) - target
    error_after = reading(delta_update(state, direction, target, beta), direction) - target
    torch.testing.assert_close(error_after, (1 - beta.double()) * error_before, rtol=1e-5, atol=1e-5)
    over = beta.squeeze(-1) > 1
    assert over.any()
    # over-relaxed: the reading crosses the target
    assert (torch.sign(error_after[over]) == -torch.sign(error_before[over])).all()


def test_orthogonal_component_is_untouched():
    state, direction, target, beta = random_inputs()
    k = unit_direction(direction).double()
    projector = torch.eye(D, dtype=torch.float64) - k.unsqueeze(-1) * k.unsqueeze(-2)  # (..., D, D)
    out = delta_update(state, direction, target, beta)
    torch.testing.assert_close(projector @ out, projector @ state, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta_value", [0.3, 1.0, 1.7, 2.0])
def test_shortcut_spectrum_and_householder(beta_value):
    # With a zero target and X = I (d_v = d) the update returns the shortcut matrix I - beta k k^T itself.
    direction = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shortcut = delta_update(
        torch.eye(D, dtype=torch.float64), direction, torch.zeros(D, dtype=torch.float64), torch.tensor([beta_value])
    )
    eigenvalues = torch.linalg.eigvalsh(shortcut).sort().values
    expected = torch.tensor(sorted([1.0] * (D - 1) + [1.0 - beta_value]), dtype=torch.float64)
    torch.testing.assert_close(eigenvalues, expected, rtol=1e-5, atol=1e-5)
    k = unit_direction(direction).double()
    torch.testing.assert_close(shortcut @ k, (1 - beta_value) * k, rtol=1e-5, atol=1e-5)
    if beta_value == 2.0:
        torch.testing.assert_close(shortcut @ shortcut, torch.eye(D, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        assert torch.linalg.det(shortcut).item() == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.parametrize("value_channels", [1, DV])
def test_zero_direction_is_finite_and_leaves_the_state(value_channels):
    state, direction, target, beta = random_inputs(value_channels=value_channels, dtype=torch.float32)
    out = delta_update(state, torch.zeros_like(direction), target, beta)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, state)


def test_zero_direction_has_finite_gradients():
    state, direction, target, beta = random_inputs(dtype=torch.float32)
    direction = torch.zeros_like(direction).requires_grad_()
    state = state.requires_grad_()
    delta_update(state, direction, target, beta).square().sum().backward()
    assert torch.isfinite(direction.grad).all() and torch.isfinite(state.grad).all()


def test_write_only_adds_the_gated_target_along_k():
    state, direction, target, beta = random_inputs()
    k = unit_direction(direction).double()
    expected = state + beta.unsqueeze(-1) * k.unsqueeze(-1) * target.unsqueeze(-2)
    torch.testing.assert_close(write_only_update(state, direction, target, beta), expected)


@pytest.mark.parametrize("value_channels", [1, DV])
def test_gradcheck_float64(value_channels):
    inputs = [t.requires_grad_() for t in random_inputs(batch=(2,), value_channels=value_channels)]
    assert torch.autograd.gradcheck(lambda *args: delta_update(*args), inputs)
    assert torch.autograd.gradcheck(lambda *args: write_only_update(*args), inputs)


def test_low_precision_keeps_state_dtype_and_is_close_to_float32():
    state, direction, target, beta = random_inputs(dtype=torch.float32)
    reference = delta_update(state, direction, target, beta)
    out = delta_update(state.bfloat16(), direction.bfloat16(), target.bfloat16(), beta)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2)
