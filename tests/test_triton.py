"""The Triton rewrite (`set_implementation("triton")`) against the reference: on CUDA, or in Triton's interpreter on
the CPU (skipped where Triton is not installed)."""

import pytest
import torch

pytest.importorskip("triton")  # without CUDA, conftest.py has set TRITON_INTERPRET=1 before Triton's import

from conftest import TEST_VOCAB, perturbed_model  # noqa: E402

from ddl_transformers import delta_ops  # noqa: E402
from ddl_transformers.delta_ops import (  # noqa: E402
    delta_update,
    fused_delta_update,
    fused_write_only_update,
    write_only_update,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAIRS = {"delta": (delta_update, fused_delta_update), "write_only": (write_only_update, fused_write_only_update)}
MAX_ERROR = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def triton_operators():
    delta_ops.set_implementation("triton")
    yield
    delta_ops.set_implementation("fused")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return ((got.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def rewrite_inputs(value_channels: int, hidden: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state_shape = (2, 5, hidden) if value_channels == 1 else (2, 5, hidden, value_channels)
    return [
        torch.randn(state_shape, generator=generator, dtype=torch.float64),
        torch.randn(2, 5, hidden, generator=generator, dtype=torch.float64),
        torch.randn(2, 5, value_channels, generator=generator, dtype=torch.float64),
        2 * torch.rand(2, 5, 1, generator=generator, dtype=torch.float64),
    ]


@pytest.mark.parametrize("mode", list(PAIRS))
@pytest.mark.parametrize("value_channels, hidden", [(1, 24), (4, 24), (3, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rewrite_matches_the_float64_reference(mode, value_channels, hidden, dtype, triton_operators):
    reference, fused = PAIRS[mode]
    wide = [t.requires_grad_() for t in rewrite_inputs(value_channels, hidden)]
    low = [
        t.detach().to(DEVICE, torch.float32 if i == 3 else dtype).requires_grad_() for i, t in enumerate(wide)
    ]  # the gate stays float32, as in the model
    assert delta_ops._triton_kernels(low[0]) is not None, "the Triton path is taken"
    expected, got = reference(*wide), fused(*low)
    assert got.dtype == dtype and got.shape == expected.shape
    if value_channels > 1:
        assert got.transpose(-1, -2).is_contiguous(), "an expanded result is channel-major"
    grad_out = torch.randn(expected.shape, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, wide, grad_out)
    grads = torch.autograd.grad(got, low, grad_out.to(DEVICE, dtype))
    assert relative_error(got, expected.detach()) < MAX_ERROR[dtype]
    for grad, expected_grad, tensor in zip(grads, expected_grads, low):
        assert grad.dtype == tensor.dtype
        assert relative_error(grad, expected_grad) < MAX_ERROR[dtype] * 2
    with torch.no_grad():  # the decoding path
        assert relative_error(fused(*low), expected.detach()) < MAX_ERROR[dtype]


def test_triton_handles_any_input_layout_and_a_zero_direction(triton_operators):
    state, direction, target, beta = (t.float().to(DEVICE) for t in rewrite_inputs(4, 16))
    for layout in (state, state.transpose(-1, -2).contiguous().transpose(-1, -2), state[:, :1].expand_as(state)):
        torch.testing.assert_close(
            fused_delta_update(layout, direction, target, beta),
            delta_update(layout, direction, target, beta),
            rtol=1e-5,
            atol=1e-5,
        )
    zero = torch.zeros_like(direction)
    torch.testing.assert_close(fused_delta_update(state, zero, target, beta), state)


@pytest.mark.parametrize("name", ["ddl-scalar", "ddl-cc", "write-only"])
def test_triton_model_matches_the_fused_model(name):
    # the state tape undoes the Triton rewrites too: same logits and gradients as the eager fused operators
    model = perturbed_model(name, num_hidden_layers=2).to(DEVICE).train()
    tokens = torch.randint(3, TEST_VOCAB, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def logits_and_grads():
        model.zero_grad()
        out = model(tokens, labels=tokens)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters()]

    expected_logits, expected_grads = logits_and_grads()
    delta_ops.set_implementation("triton")
    try:
        logits, grads = logits_and_grads()
    finally:
        delta_ops.set_implementation("fused")
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_triton_is_refused_clearly_when_missing(monkeypatch):
    monkeypatch.setattr(delta_ops, "_triton_module", lambda: None)
    with pytest.raises(ValueError, match="pip install triton"):
        delta_ops.set_implementation("triton")
    assert delta_ops.get_implementation() == "fused"
