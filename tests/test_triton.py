"""The Triton rewrite (`set_implementation("triton")`) against the reference: on CUDA, or in Triton's interpreter on
the CPU (skipped where Triton is not installed)."""

from contextlib import nullcontext
from unittest.mock import patch

import pytest
import torch

pytest.importorskip("triton")  # without CUDA, conftest.py has set TRITON_INTERPRET=1 before Triton's import

from conftest import TEST_VOCAB, logits_and_grads, perturbed_model, relative_error  # noqa: E402
from test_state_tape import layer_outputs_alive_after_forward  # noqa: E402

from ddl_transformers import DDLModel, delta_ops, state_tape  # noqa: E402
from ddl_transformers.delta_ops import (  # noqa: E402
    delta_update,
    fused_delta_update,
    fused_token_mix,
    fused_write_only_update,
    token_mix,
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
    assert delta_ops._triton_kernels(low[0], low[1]) is not None, "the Triton path is taken"
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


def token_mix_inputs(seq_len: int, hidden: int, history: bool, kernel_size: int = 4, value_channels: int = 4):
    """float64 states `(2, T, d, d_v)`, a convolution weight of `kernel_size` taps, the read and, if asked, the
    states before them."""
    generator = torch.Generator().manual_seed(seq_len + hidden)
    inputs = [
        torch.randn(2, seq_len, hidden, value_channels, generator=generator, dtype=torch.float64),
        torch.randn(hidden * value_channels, 1, kernel_size, generator=generator, dtype=torch.float64),
        torch.randn(value_channels, generator=generator, dtype=torch.float64),
    ]
    if history:
        inputs.append(
            torch.randn(2, kernel_size - 1, hidden, value_channels, generator=generator, dtype=torch.float64)
        )
    return inputs


@pytest.mark.parametrize("history", [False, True])
@pytest.mark.parametrize("seq_len, hidden", [(2, 10), (9, 24), (40, 130)])  # shorter than K; several blocks each way
@pytest.mark.parametrize("kernel_size, value_channels", [(2, 3), (3, 2), (4, 4)])  # taps and channels told apart
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_token_convolution_matches_the_float64_reference(
    seq_len, hidden, history, kernel_size, value_channels, dtype, triton_operators, kernel_calls
):
    wide = token_mix_inputs(seq_len, hidden, history, kernel_size, value_channels)
    wide = [t.requires_grad_() for t in wide]
    low = [  # the convolution weight and the read stay float32, as the model's parameters
        t.detach().to(DEVICE, torch.float32 if i in (1, 2) else dtype).requires_grad_() for i, t in enumerate(wide)
    ]
    expected, got = token_mix(*wide), fused_token_mix(*low)
    assert got.dtype == dtype and got.shape == expected.shape
    grad_out = torch.randn(expected.shape, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, wide, grad_out)
    grads = torch.autograd.grad(got, low, grad_out.to(DEVICE, dtype))
    assert (kernel_calls["token_conv_forward"], kernel_calls["token_conv_backward"]) == (1, 1)
    assert relative_error(got, expected.detach()) < MAX_ERROR[dtype]
    for grad, expected_grad, tensor in zip(grads, expected_grads, low):
        assert grad.dtype == tensor.dtype
        assert relative_error(grad, expected_grad) < MAX_ERROR[dtype] * 2
    if dtype == torch.float32:  # element by element too: one wrong element hides in a whole-tensor error
        torch.testing.assert_close(got.double().cpu(), expected.detach(), rtol=1e-4, atol=1e-4)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # prefill: the forward kernel alone
        assert relative_error(fused_token_mix(*low), expected.detach()) < MAX_ERROR[dtype]
    assert kernel_calls["token_conv_forward"] == 2


def test_triton_token_convolution_under_autocast(triton_operators, kernel_calls):
    # as a convolution under autocast: the output in autocast's dtype, here summed in float32 from float32 states
    wide = [t.requires_grad_() for t in token_mix_inputs(9, 24, history=False)]
    low = [t.detach().float().to(DEVICE).requires_grad_() for t in wide]
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        got = fused_token_mix(*low)
        delta_ops.set_implementation("fused")
        assert got.dtype == fused_token_mix(*low).dtype == torch.bfloat16
    expected = token_mix(*wide)
    assert relative_error(got, expected.detach()) < MAX_ERROR[torch.bfloat16]
    grads = torch.autograd.grad(got.float().sum(), low)
    assert kernel_calls["token_conv_backward"] == 1
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected.sum(), wide)):
        assert grad.dtype == torch.float32
        assert relative_error(grad, expected_grad) < MAX_ERROR[torch.bfloat16]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of the Triton module (the rewrite's forward and backward, the token convolution's), so a
    test knows the kernels ran rather than the fallback."""
    module = delta_ops._triton_module()
    calls = dict.fromkeys(["rewrite_forward", "rewrite_backward", "token_conv_forward", "token_conv_backward"], 0)
    for name in calls:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("name", ["ddl-scalar", "ddl-cc", "ddl-tc", "write-only"])
def test_triton_model_matches_the_fused_model(name, kernel_calls):
    # the state tape undoes the Triton rewrites too: same logits and gradients as the eager fused operators
    model = perturbed_model(name, num_hidden_layers=2).to(DEVICE).train()
    tokens = torch.randint(3, TEST_VOCAB, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    expected_logits, expected_grads = logits_and_grads(model, tokens)
    delta_ops.set_implementation("triton")
    try:
        logits, grads = logits_and_grads(model, tokens)
    finally:
        delta_ops.set_implementation("fused")
    sublayers = 2 * model.config.num_hidden_layers
    convolutions = sublayers if model.config.state_compressor == "token" else 0
    assert kernel_calls == {
        "rewrite_forward": sublayers,
        "rewrite_backward": sublayers,
        "token_conv_forward": convolutions,
        "token_conv_backward": convolutions,
    }, "every rewrite and token convolution ran as the Triton kernels"
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for grad, expected in zip(grads.values(), expected_grads.values()):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["ddl-scalar", "ddl-tc"])
def test_triton_states_are_rebuilt_by_the_state_tape(name, triton_operators, kernel_calls):
    # the kernels save a view of the input state: the tape must still turn it into a token, not keep the state
    model = perturbed_model(name, num_hidden_layers=3).to(DEVICE).train()
    tokens = torch.randint(3, TEST_VOCAB, (2, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    with patch.object(DDLModel, "_state_recording", lambda self, state: nullcontext()):
        kept, loss = layer_outputs_alive_after_forward(model, tokens)
    assert kept[:-1] == [True, True]
    expected = gradients(loss)
    saved, pack = [], state_tape.StateTape.pack  # what the tape made of each saved tensor
    with patch.object(state_tape.StateTape, "pack", lambda tape, t: saved.append(pack(tape, t)) or saved[-1]):
        kept, loss = layer_outputs_alive_after_forward(model, tokens)
        triton_tokens = sum(isinstance(packed, state_tape._StateToken) for packed in saved)
        saved.clear()
        delta_ops.set_implementation("fused")
        layer_outputs_alive_after_forward(model, tokens)
        delta_ops.set_implementation("triton")
    assert kept[:-1] == [False, False], "only the last state is kept; the others are rebuilt in backward"
    fused_tokens = sum(isinstance(packed, state_tape._StateToken) for packed in saved)
    assert triton_tokens == fused_tokens > 0, "the Triton rewrite's saved input state is a token, as the eager one's"
    rebuilt = gradients(loss)
    assert kernel_calls["rewrite_backward"] == 2 * 2 * model.config.num_hidden_layers
    for grad, expected_grad in zip(rebuilt, expected):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5 * max(expected_grad.abs().max(), 1.0))


def test_triton_cached_decoding_matches_the_full_forward(triton_operators, kernel_calls):
    model = perturbed_model("ddl-tc", num_hidden_layers=2).to(DEVICE)
    tokens = torch.randint(3, TEST_VOCAB, (2, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        full = model(tokens).logits
        out = model(tokens[:, :5], use_cache=True)
        steps = [out.logits]
        for index in range(5, 8):
            out = model(tokens[:, index : index + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    assert kernel_calls["rewrite_forward"] == 5 * 2 * model.config.num_hidden_layers
    # the full forward's and the prompt's convolutions; a decoded token's is one multiply-and-sum over its window
    assert kernel_calls["token_conv_forward"] == 2 * 2 * model.config.num_hidden_layers
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", [(0, 3), (2, 0)])
@pytest.mark.parametrize("value_channels", [1, 4])
def test_empty_batches_rewrite_to_empty_states(lead, value_channels, triton_operators):
    hidden = 8
    state = torch.randn(*lead, hidden, *([value_channels] if value_channels > 1 else []), device=DEVICE)
    inputs = [state, torch.randn(*lead, hidden), torch.randn(*lead, value_channels), torch.rand(*lead, 1)]
    inputs = [t.to(DEVICE).requires_grad_() for t in inputs]
    for rewrite in (fused_delta_update, fused_write_only_update):
        out = rewrite(*inputs)
        assert out.shape == state.shape
        out.sum().backward()


def test_triton_falls_back_where_it_does_not_fit(triton_operators):
    state, direction = torch.randn(2, 16, 4, device=DEVICE), torch.randn(2, 16, device=DEVICE)
    assert delta_ops._triton_kernels(state, direction) is not None
    assert delta_ops._triton_kernels(state.double(), direction.double()) is None, "float64 keeps the eager code"
    wide = torch.empty(1, 1 << 15, 4, device=DEVICE)
    assert delta_ops._triton_kernels(wide, wide[..., 0]) is None, "too large a state for one program"


def test_compiled_code_keeps_the_traceable_operators(triton_operators, monkeypatch):
    state, direction = torch.randn(2, 16, 4, device=DEVICE), torch.randn(2, 16, device=DEVICE)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert delta_ops._triton_kernels(state, direction) is None


@pytest.mark.slow
def test_triton_implementation_under_torch_compile(triton_operators, kernel_calls):
    # compiled code uses the eager fused operators (traced by Dynamo); the kernels serve eager runs
    torch._dynamo.reset()
    model = perturbed_model("ddl-cc", num_hidden_layers=1).to(DEVICE).train()
    tokens = torch.randint(3, TEST_VOCAB, (2, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    expected = model(tokens, labels=tokens).logits
    kernel_calls["rewrite_forward"] = 0
    logits = torch.compile(model, backend="aot_eager")(tokens, labels=tokens).logits
    assert kernel_calls["rewrite_forward"] == 0
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_triton_is_refused_clearly_when_missing(monkeypatch):
    monkeypatch.setattr(delta_ops, "_triton_module", lambda: None)
    with pytest.raises(ValueError, match="pip install triton"):
        delta_ops.set_implementation("triton")
    assert delta_ops.get_implementation() == delta_ops.DEFAULT_IMPLEMENTATION
