"""The C kernels of the native implementation (`cpu_kernels.py`): against the reference operators, inside the model
(where they must run, and only where they apply), and when they cannot be built."""

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from conftest import ALL_PRESETS, TEST_VOCAB, logits_and_grads, perturbed_model, relative_error, tiny_config

from ddl_transformers import cpu_kernels, delta_ops
from ddl_transformers.delta_ops import channel_mix, delta_update, expand_embeddings, token_mix, write_only_update
from ddl_transformers.modeling_ddl import DDLDeltaResidual


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def two_threads():
    """Two threads, so that calls of 32 tokens or more take the kernels' OpenMP loop."""
    with torch_threads(2):
        yield


@pytest.fixture
def three_threads():
    """Three threads: 67 tokens do not split evenly over them."""
    with torch_threads(3):
        yield


NO_GRAD_KERNELS = ("rewrite", "projected_rewrite", "channel_mix", "token_mix_step", "expansion_step")
TRAINING_KERNELS = (
    "rewrite_forward",
    "rewrite_backward",
    "projected_rewrite_forward",
    "projected_rewrite_backward",
    "channel_mix_backward",
    "expansion_forward",
    "expansion_backward",
    "token_conv_forward",
    "token_conv_backward",
)


@pytest.fixture
def kernel_calls(monkeypatch) -> dict[str, int]:
    """Counts the calls of each kernel that returned a result (a None means the kernel did not apply)."""
    calls = dict.fromkeys([*NO_GRAD_KERNELS, *TRAINING_KERNELS], 0)

    def counting(name: str):
        kernel = getattr(cpu_kernels, name)

        def counted(*args, **kwargs):
            result = kernel(*args, **kwargs)
            calls[name] += result is not None
            return result

        return counted

    for name in calls:
        monkeypatch.setattr(cpu_kernels, name, counting(name))
    return calls


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty cache folder, and the library and module loaded anew (before and after the test)."""
    monkeypatch.setenv("DDL_TRANSFORMERS_CACHE", str(tmp_path))
    cpu_kernels.load.cache_clear()
    delta_ops._native_module.cache_clear()
    yield tmp_path
    cpu_kernels.load.cache_clear()
    delta_ops._native_module.cache_clear()


def channel_major_state(*shape: int) -> torch.Tensor:
    """A random `(..., d, d_v)` state with channel-major memory, as the fused operators make them."""
    return torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)


def rewrite_inputs(lead: tuple[int, ...], hidden: int, channels: int) -> list[torch.Tensor]:
    state = torch.randn(*lead, hidden) if channels == 1 else channel_major_state(*lead, hidden, channels)
    direction = torch.randn(*lead, hidden)
    if direction.numel():
        direction.view(-1, hidden)[0] = 0  # h = 0: k = 0, no NaN
    return [state, direction, torch.randn(*lead, channels), 2 * torch.rand(*lead, 1)]


@pytest.mark.parametrize("erase", [True, False])
@pytest.mark.parametrize("lead", [(1, 1), (3, 40)], ids=["one-token", "120-tokens"])
@pytest.mark.parametrize("channels", [1, 4])
def test_rewrite_matches_the_reference(erase, lead, channels, two_threads):
    torch.manual_seed(0)
    state, direction, target, beta = rewrite_inputs(lead, 24, channels)
    got = cpu_kernels.rewrite(state, direction, target, beta, 1e-5, erase)
    reference = delta_update if erase else write_only_update
    expected = reference(*(t.double() for t in (state, direction, target, beta)), 1e-5)
    assert got.stride() == state.stride()  # channel-major stays channel-major
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("erase", [True, False])
@pytest.mark.parametrize("lead", [(1, 1), (0, 4), (3, 40), (1, 67)], ids=["one-token", "none", "120-tokens", "67"])
@pytest.mark.parametrize("channels", [1, 4])
def test_training_rewrite_matches_the_reference(erase, lead, channels, three_threads, kernel_calls):
    torch.manual_seed(0)
    inputs = [tensor.requires_grad_() for tensor in rewrite_inputs(lead, 24, channels)]
    grad_out = torch.randn(inputs[0].shape[::-1]).permute(*range(inputs[0].dim() - 1, -1, -1))  # any layout
    fused = delta_ops.fused_delta_update if erase else delta_ops.fused_write_only_update
    out = fused(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    assert kernel_calls["rewrite_forward"] == kernel_calls["rewrite_backward"] == 1
    assert out.stride() == inputs[0].stride()  # channel-major stays channel-major
    reference = delta_update if erase else write_only_update
    wide = [tensor.detach().double().requires_grad_() for tensor in inputs]
    expected = reference(*wide, 1e-5)
    expected_grads = torch.autograd.grad(expected, wide, grad_out.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad, tensor in zip(grads, expected_grads, inputs):
        assert grad.shape == tensor.shape and grad.dtype == torch.float32
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("erase", [True, False])
@pytest.mark.parametrize("channels", [1, 4])
def test_the_eager_backward_runs_where_the_c_backward_does_not_apply(erase, channels, monkeypatch):
    torch.manual_seed(0)
    fused = delta_ops.fused_delta_update if erase else delta_ops.fused_write_only_update
    inputs = [tensor.requires_grad_() for tensor in rewrite_inputs((2, 5), 24, channels)]
    grad_out = torch.randn(inputs[0].shape)
    expected = torch.autograd.grad(fused(*inputs), inputs, grad_out)
    rows, h, scale, beta, read, error = fused(*inputs).grad_fn.saved_tensors
    assert cpu_kernels.rewrite_backward(grad_out.double(), channels == 1, rows, h, beta, scale, read, error) is None
    monkeypatch.setattr(cpu_kernels, "rewrite_backward", lambda *args, **kwargs: None)
    for grad, expected_grad in zip(torch.autograd.grad(fused(*inputs), inputs, grad_out), expected):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 4])
def test_the_c_backward_skips_a_state_gradient_nobody_needs(channels, kernel_calls):
    torch.manual_seed(0)
    state, *inputs = rewrite_inputs((2, 5), 24, channels)
    inputs = [tensor.requires_grad_() for tensor in inputs]  # the state needs no gradient
    grad_out = torch.randn(state.shape)
    grads = torch.autograd.grad(delta_ops.fused_delta_update(state, *inputs), inputs, grad_out)
    assert kernel_calls["rewrite_backward"] == 1
    wide = [tensor.detach().double().requires_grad_() for tensor in inputs]
    expected = torch.autograd.grad(delta_update(state.double(), *wide, 1e-5), wide, grad_out.double())
    for grad, expected_grad in zip(grads, expected):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)


def c_backward_setting(setting: str) -> tuple[AbstractContextManager, AbstractContextManager]:
    """The contexts for a forward and its backward under which a C backward must step aside: a saved-tensor hook that
    gives back the same values with other strides, or compiled autograd (Dynamo traces the backward: no C call can be
    in it)."""
    if setting == "saved-tensor hook":

        def other_layout(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if tensor.dim() < 2 else tensor.mT.contiguous().mT

        return torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, other_layout), nullcontext()
    torch._dynamo.reset()
    return nullcontext(), torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager"))


@pytest.mark.parametrize("setting", ["saved-tensor hook", "compiled autograd"])
def test_the_c_backward_steps_aside_where_it_cannot_run(setting, kernel_calls):
    torch.manual_seed(0)
    inputs = [tensor.requires_grad_() for tensor in rewrite_inputs((2, 5), 24, 3)]
    grad_out = torch.randn(inputs[0].shape)
    expected = torch.autograd.grad(delta_ops.fused_delta_update(*inputs), inputs, grad_out)
    kernel_calls["rewrite_backward"] = 0
    forward_context, backward_context = c_backward_setting(setting)
    with forward_context:
        out = delta_ops.fused_delta_update(*inputs)
    with backward_context:
        (out * grad_out).sum().backward()
    for tensor, expected_grad in zip(inputs, expected):
        torch.testing.assert_close(tensor.grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert kernel_calls["rewrite_backward"] == 0


@pytest.mark.parametrize("needs_grad", ["both", "state", "weight"])
@pytest.mark.parametrize("lead", [(1, 1), (0, 3), (2, 33), (1, 67)], ids=["one-token", "none", "66-tokens", "67"])
def test_channel_mix_backward_matches_the_reference(needs_grad, lead, three_threads, kernel_calls):
    torch.manual_seed(0)
    tensors = {"state": channel_major_state(*lead, 24, 4), "weight": torch.randn(24, 4)}
    names = ["state", "weight"] if needs_grad == "both" else [needs_grad]
    inputs = [tensors[name].requires_grad_() for name in names]
    out = delta_ops.fused_channel_mix(tensors["state"], tensors["weight"])
    grad_out = torch.randn(out.shape)
    grads = torch.autograd.grad(out, inputs, grad_out)
    assert kernel_calls["channel_mix"] == kernel_calls["channel_mix_backward"] == 1
    wide = {name: tensor.detach().double().requires_grad_() for name, tensor in tensors.items()}
    expected = torch.autograd.grad(channel_mix(**wide), [wide[name] for name in names], grad_out.double())
    for grad, expected_grad in zip(grads, expected):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)
    if "state" in names:
        assert grads[0].mT.is_contiguous()  # channel-major, like the rewrite's state gradient


def projected_inputs(lead: tuple[int, ...], hidden: int, channels: int, value_bias: bool) -> dict[str, torch.Tensor]:
    """A rewrite's state and direction, a context, and value and gate projections as `nn.Linear` weights."""
    state, direction = rewrite_inputs(lead, hidden, channels)[:2]
    tensors = {"state": state, "direction": direction, "context": torch.randn(*lead, hidden)}
    tensors.update(value_weight=torch.randn(channels, hidden) / 3, gate_weight=torch.randn(1, hidden) / 3)
    tensors.update(value_bias=torch.randn(channels) if value_bias else None, gate_bias=torch.randn(1))
    return tensors


def projected_reference(state, direction, context, value_weight, value_bias, gate_weight, gate_bias, erase, scale):
    """The projected rewrite as the model's reference path computes it: target and gate, then the rewrite."""
    value = torch.nn.functional.linear(context, value_weight, value_bias)
    target = value if scale is None else scale * torch.sigmoid(value)
    beta = 2 * torch.sigmoid(torch.nn.functional.linear(context, gate_weight, gate_bias))
    return (delta_update if erase else write_only_update)(state, direction, target, beta, 1e-5)


def projected_native(tensors: dict[str, torch.Tensor], erase: bool, scale: float | None) -> torch.Tensor:
    """`delta_ops.projected_rewrite` on `tensors`."""
    names = ("state", "direction", "context", "value_weight", "value_bias", "gate_weight", "gate_bias")
    return delta_ops.projected_rewrite(*(tensors[name] for name in names), 1e-5, erase, scale)


def as_parameters(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors, those named requiring gradients (weights and biases as `nn.Parameter`s, frozen or not)."""
    out = {}
    for name, tensor in tensors.items():
        if tensor is not None and name.endswith(("weight", "bias")):
            tensor = torch.nn.Parameter(tensor.clone(), requires_grad=name in names)
        elif tensor is not None and name in names:
            tensor = tensor.clone().requires_grad_()
        out[name] = tensor
    return out


@pytest.mark.parametrize("needs_grad", ["all", "weights", "context", "state"])
@pytest.mark.parametrize("value", ["sigmoid", "linear"])
@pytest.mark.parametrize("erase", [True, False])
@pytest.mark.parametrize("lead", [(1, 1), (0, 4), (1, 67)], ids=["one-token", "none", "67"])
@pytest.mark.parametrize("channels", [1, 4])
def test_projected_training_matches_the_reference(
    needs_grad, value, erase, lead, channels, three_threads, kernel_calls
):
    torch.manual_seed(0)
    tensors = projected_inputs(lead, 24, channels, value_bias=value == "sigmoid")
    every = ["state", "direction", "context", "value_weight", "value_bias", "gate_weight", "gate_bias"]
    names = {"all": every, "weights": every[3:], "context": ["context"], "state": ["state", "direction"]}[needs_grad]
    names = [name for name in names if tensors[name] is not None]
    scale = 4.0 if value == "sigmoid" else None
    inputs = as_parameters(tensors, names)
    out = projected_native(inputs, erase, scale)
    assert kernel_calls["projected_rewrite_forward"] == 1
    assert out.stride() == tensors["state"].stride()  # channel-major stays channel-major
    grad_out = torch.randn(out.shape)
    grads = torch.autograd.grad(out, [inputs[name] for name in names], grad_out)
    assert kernel_calls["projected_rewrite_backward"] == 1
    wide = as_parameters({k: None if v is None else v.double() for k, v in tensors.items()}, names)
    expected = projected_reference(**wide, erase=erase, scale=scale)
    expected_grads = torch.autograd.grad(expected, [wide[name] for name in names], grad_out.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert grad.shape == tensors[name].shape and grad.dtype == torch.float32
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("c_backward", [True, False], ids=["C", "eager"])
def test_projected_gradients_keep_their_precision_with_saturated_targets_and_large_states(c_backward, monkeypatch):
    # a target near 0 (a saturated sigmoid) read back as error + read, with |read| in the hundreds, would lose most of
    # v (1 - v / s); the backward keeps the target itself
    torch.manual_seed(0)
    tensors = projected_inputs((2, 40), 32, 4, value_bias=True)
    tensors["state"] = tensors["state"] * 1000
    tensors["value_bias"] = tensors["value_bias"] - 12
    if not c_backward:
        monkeypatch.setattr(cpu_kernels, "projected_rewrite_backward", lambda *args: None)
    names = ["value_bias", "value_weight"]
    inputs = as_parameters(tensors, names)
    grad_out = torch.randn(tensors["state"].shape)
    grads = torch.autograd.grad(projected_native(inputs, True, 4.0), [inputs[n] for n in names], grad_out)
    wide = as_parameters({k: v.double() for k, v in tensors.items()}, names)
    expected = projected_reference(**wide, erase=True, scale=4.0)
    expected_grads = torch.autograd.grad(expected, [wide[n] for n in names], grad_out.double())
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert relative_error(grad, expected_grad) < 1e-5, name


def test_a_projection_weight_that_needs_a_gradient_keeps_autograd(kernel_calls):
    # a weight that is a plain tensor (not a parameter) requiring a gradient: the autograd node, not the no-grad call
    residual = DDLDeltaResidual(tiny_config("ddl-cc")).requires_grad_(False)
    state, direction = rewrite_inputs((1, 3), residual.value_proj.in_features, 4)[:2]
    weight = residual.value_proj.weight.detach().clone().requires_grad_()
    del residual.value_proj.weight
    residual.value_proj.weight = weight
    residual(state, direction, direction).sum().backward()
    assert weight.grad is not None and kernel_calls["projected_rewrite"] == 0


@pytest.mark.parametrize("setting", ["no C backward", "saved-tensor hook", "compiled autograd"])
@pytest.mark.parametrize("channels", [1, 4])
def test_the_projected_backward_without_c_matches(setting, channels, kernel_calls, monkeypatch):
    torch.manual_seed(0)
    tensors = projected_inputs((2, 5), 24, channels, value_bias=True)
    names = [name for name in tensors if name != "context"]  # the context needs no gradient here
    inputs = as_parameters(tensors, names)
    grad_out = torch.randn(tensors["state"].shape)
    expected = torch.autograd.grad(projected_native(inputs, True, 4.0), [inputs[n] for n in names], grad_out)
    assert kernel_calls["projected_rewrite_backward"] == 1
    forward_context, backward_context = nullcontext(), nullcontext()
    if setting == "no C backward":
        monkeypatch.setattr(cpu_kernels, "projected_rewrite_backward", lambda *args: None)
    else:
        forward_context, backward_context = c_backward_setting(setting)
    with forward_context:
        out = projected_native(inputs, True, 4.0)
    with backward_context:
        (out * grad_out).sum().backward()
    for name, expected_grad in zip(names, expected):
        torch.testing.assert_close(inputs[name].grad, expected_grad, rtol=1e-5, atol=1e-6, msg=name)
    assert kernel_calls["projected_rewrite_backward"] == 1


@pytest.mark.parametrize("needs_grad", ["both", "window", "weight"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 4), (2, 37, 4), (3, 30, 1), (1, 2, 5)], ids=["one", "74", "kernel-1", "short"]
)
def test_expansion_training_kernels_match_the_reference(needs_grad, shape, three_threads, kernel_calls):
    torch.manual_seed(0)
    batch, seq_len, kernel_size = shape
    tensors = {
        "window": torch.randn(batch, kernel_size - 1 + seq_len, 24),
        "weight": torch.randn(24 * 3, 1, kernel_size),
    }
    names = ["window", "weight"] if needs_grad == "both" else [needs_grad]
    inputs = {name: tensor.clone().requires_grad_(name in names) for name, tensor in tensors.items()}
    out = delta_ops.fused_expand_embeddings(inputs["window"], inputs["weight"])
    assert out.mT.is_contiguous()  # channel-major
    grad_out = torch.randn(out.shape)
    grads = torch.autograd.grad(out, [inputs[name] for name in names], grad_out)
    assert kernel_calls["expansion_forward"] == kernel_calls["expansion_backward"] == 1
    wide = {name: tensor.double().requires_grad_(name in names) for name, tensor in tensors.items()}
    expected = expand_embeddings(wide["window"], wide["weight"])
    expected_grads = torch.autograd.grad(expected, [wide[name] for name in names], grad_out.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("needs_grad", ["all", "states", "weights"])
@pytest.mark.parametrize(
    ("batch", "seq_len", "kernel_size", "history_len"),
    [(2, 37, 4, None), (3, 30, 3, 2), (1, 2, 4, None), (2, 40, 1, None)],
    ids=["74", "history", "short", "kernel-1"],
)
def test_token_conv_training_kernels_match_the_reference(
    needs_grad, batch, seq_len, kernel_size, history_len, three_threads, kernel_calls
):
    torch.manual_seed(0)
    tensors = {
        "states": channel_major_state(batch, seq_len, 24, 3),
        "conv_weight": torch.randn(24 * 3, 1, kernel_size),
        "read": torch.randn(3),
        "history": None if history_len is None else torch.randn(batch, history_len, 24, 3),
    }
    names = {"all": ["states", "conv_weight", "read"], "states": ["states"], "weights": ["conv_weight", "read"]}
    names = names[needs_grad] + (["history"] if history_len and needs_grad == "all" else [])
    inputs = {k: None if v is None else v.clone().requires_grad_(k in names) for k, v in tensors.items()}
    out = delta_ops.fused_token_mix(**inputs)
    grad_out = torch.randn(out.shape)
    grads = torch.autograd.grad(out, [inputs[name] for name in names], grad_out)
    assert kernel_calls["token_conv_forward"] == kernel_calls["token_conv_backward"] == 1
    wide = {k: None if v is None else v.double().requires_grad_(k in names) for k, v in tensors.items()}
    expected = token_mix(**wide)
    expected_grads = torch.autograd.grad(expected, [wide[name] for name in names], grad_out.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_native_training_matches_the_reference(name, checkpointing, kernel_calls, two_threads):
    model = perturbed_model(name).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokens = torch.randint(3, TEST_VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))  # 40 tokens a call
    delta_ops.set_implementation("reference")
    expected_logits, expected_grads = logits_and_grads(model, tokens)
    delta_ops.set_implementation("native")
    logits, grads = logits_and_grads(model, tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for param_name, grad in grads.items():
        scale = expected_grads[param_name].abs().max().item()
        expected_grad = expected_grads[param_name]
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=param_name)
    config = model.config
    delta = config.residual_mode != "additive"
    forwards = (2 if checkpointing else 1) * 2 * config.num_hidden_layers * delta  # checkpointing runs it again
    # plain projections: every rewrite is the projected node, forward and backward in C
    assert kernel_calls["projected_rewrite_forward"] == forwards
    assert kernel_calls["projected_rewrite_backward"] == forwards // (1 + checkpointing)
    assert kernel_calls["rewrite_forward"] == kernel_calls["rewrite_backward"] == 0
    channel_reads = 2 * config.num_hidden_layers * (config.state_compressor == "channel") + 1  # and the readout
    assert kernel_calls["channel_mix_backward"] == channel_reads * config.expanded_state
    token_convs = 2 * config.num_hidden_layers * (config.expanded_state and config.state_compressor == "token")
    assert kernel_calls["token_conv_forward"] == token_convs * (1 + checkpointing)
    assert kernel_calls["token_conv_backward"] == token_convs
    expansions = int(config.uses_embedding_expansion)  # before the first layer: never checkpointed
    assert kernel_calls["expansion_forward"] == kernel_calls["expansion_backward"] == expansions


@pytest.mark.parametrize("lead", [(1, 1), (2, 33)], ids=["one-token", "66-tokens"])
def test_channel_mix_matches_the_reference(lead, two_threads):
    torch.manual_seed(0)
    state, weight = channel_major_state(*lead, 24, 3), torch.randn(24, 3)
    expected = channel_mix(state.double(), weight.double())
    torch.testing.assert_close(cpu_kernels.channel_mix(state, weight).double(), expected, rtol=1e-5, atol=1e-5)


def token_conv_step_inputs(batch: int = 3, hidden: int = 24, channels: int = 4, kernel_size: int = 4):
    """A decoded token's state, its history in the cache's layout (channel-major, time last), the TC weights."""
    state = channel_major_state(batch, 1, hidden, channels)
    cached = torch.randn(batch, channels * hidden, kernel_size - 1)
    history = cached.transpose(1, 2).unflatten(-1, (channels, hidden)).transpose(-1, -2)  # (B, K - 1, d, d_v)
    return [state, torch.randn(hidden * channels, 1, kernel_size), torch.randn(channels), history]


@pytest.mark.parametrize("layout", ["cache", "permuted", "broadcast"])
def test_the_token_convolution_step_matches_the_reference(layout):
    torch.manual_seed(0)
    state, conv_weight, read, history = token_conv_step_inputs()
    if layout == "permuted":  # every stride differs from the cache's, the time stride too
        history = torch.randn(3, 4, 24, 3).permute(0, 3, 2, 1)
    elif layout == "broadcast":
        history = torch.randn(1, 3, 24, 4).expand(3, -1, -1, -1)
    got = cpu_kernels.token_mix_step(state, conv_weight, read, history)
    expected = token_mix(*(t.double() for t in (state, conv_weight, read, history)))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "cache", "broadcast"])
def test_the_expansion_step_matches_the_reference(layout):
    torch.manual_seed(0)
    window, conv_weight = torch.randn(3, 4, 24), torch.randn(24 * 4, 1, 4)
    if layout == "cache":  # the cache keeps the embeddings time last: (B, d, K) seen as (B, K, d)
        window = torch.randn(3, 24, 4).transpose(1, 2)
    elif layout == "broadcast":
        window = torch.randn(1, 4, 24).expand(3, -1, -1)
    got = cpu_kernels.expansion_step(window, conv_weight)
    assert got.mT.is_contiguous()  # channel-major, as the fused expansion makes it
    expected = expand_embeddings(window.double(), conv_weight.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_step_inputs_the_kernels_do_not_take_give_none():
    state, conv_weight, read, history = token_conv_step_inputs()
    step = cpu_kernels.token_mix_step
    assert step(state, conv_weight, read, history[:, 1:]) is None  # a window of K - 1
    assert step(state.contiguous(), conv_weight, read, history) is None  # a row-major state
    assert step(state, torch.randn(96, 1, 8)[..., ::2], read, history) is None
    assert step(state, conv_weight, torch.randn(8)[::2], history) is None
    assert step(state, conv_weight, read, history.double()) is None
    negated = torch.randn(*history.shape, dtype=torch.complex64).conj().imag  # float32, negated lazily
    assert negated.is_neg() and step(state, conv_weight, read, negated) is None
    window = torch.randn(3, 4, 24)
    assert cpu_kernels.expansion_step(window, torch.randn(24 * 4, 1, 8)[..., ::2]) is None
    assert cpu_kernels.expansion_step(window.double(), conv_weight.double()) is None
    assert cpu_kernels.expansion_step(window[:, 1:], conv_weight) is None  # a window of K - 1


@pytest.mark.parametrize("needs_grad", ["states", "conv_weight", "read", "history", "window", "expansion weight"])
def test_one_token_steps_keep_autograd(needs_grad, kernel_calls):
    state, conv_weight, read, history = token_conv_step_inputs(1, 8, 2, 3)
    window, expansion_weight = torch.randn(1, 3, 8), torch.randn(16, 1, 3)
    tensors = {"states": state, "conv_weight": conv_weight, "read": read, "history": history}
    tensors.update({"window": window, "expansion weight": expansion_weight})
    tensors[needs_grad].requires_grad_()
    mixed = delta_ops.fused_token_mix(state, conv_weight, read, history)
    expanded = delta_ops.fused_expand_embeddings(window, expansion_weight)
    (mixed.sum() + expanded.sum()).backward()
    assert tensors[needs_grad].grad is not None
    assert kernel_calls["token_mix_step"] == (needs_grad in ("window", "expansion weight"))
    assert kernel_calls["expansion_step"] == (needs_grad not in ("window", "expansion weight"))


def test_functorch_transforms_and_forward_ad_take_the_pytorch_operators(kernel_calls):
    import torch.autograd.forward_ad as forward_ad

    state, conv_weight, read, history = token_conv_step_inputs()
    expected = delta_ops.fused_token_mix(state, conv_weight, read, history)
    assert kernel_calls["token_mix_step"] == 1
    batched = torch.func.vmap(lambda h: delta_ops.fused_token_mix(state, conv_weight, read, h))(history.unsqueeze(0))
    torch.testing.assert_close(batched[0], expected, rtol=1e-5, atol=1e-5)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(history, torch.ones_like(history))
        tangent = forward_ad.unpack_dual(delta_ops.fused_token_mix(state, conv_weight, read, dual)).tangent
    assert tangent is not None and kernel_calls["token_mix_step"] == 1


def test_training_kernels_given_mismatched_shapes_give_none():
    window, taps = torch.randn(2, 10, 64), torch.randn(3, 2, 16)  # taps of another width
    assert cpu_kernels.expansion_forward(window, taps) is None
    assert cpu_kernels.expansion_backward(torch.randn(2, 8, 64, 2), window, taps, True, True) is None
    states, kernel = torch.randn(2, 10, 3, 16), torch.randn(4, 2, 16)  # kernel of other channels
    assert cpu_kernels.token_conv_forward(states, kernel, 3) is None
    assert cpu_kernels.token_conv_backward(torch.randn(2, 10, 16), states, kernel, 3, True, True) is None


def test_tensors_the_kernels_do_not_take_give_none():
    state, direction, target, beta = rewrite_inputs((1, 2), 8, 3)
    assert cpu_kernels.rewrite(state.contiguous(), direction, target, beta, 1e-5, True) is None  # row-major state
    assert cpu_kernels.rewrite(state.bfloat16(), direction, target, beta, 1e-5, True) is None
    assert cpu_kernels.rewrite(state.to("meta"), direction, target, beta, 1e-5, True) is None
    assert cpu_kernels.channel_mix(state.double(), torch.randn(8, 3, dtype=torch.float64)) is None
    assert cpu_kernels.channel_mix(state, torch.randn(8, 4)) is None  # weight of another shape


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"value_activation": "linear"},
        {"residual_mode": "write_only"},
        {"value_channels": 1},
    ],
    ids=["sigmoid-value", "linear-value", "write-only", "scalar-state"],
)
def test_projected_rewrite_equals_the_fused_residual(overrides, kernel_calls, two_threads):
    config = tiny_config("ddl-cc", **overrides)
    torch.manual_seed(0)
    residual = DDLDeltaResidual(config)
    for param in residual.parameters():
        torch.nn.init.normal_(param, std=0.3)
    lead, hidden, channels = (3, 20), config.hidden_size, config.value_channels if config.expanded_state else 1
    state, direction = rewrite_inputs(lead, hidden, channels)[:2]
    context = torch.randn(*lead, hidden)
    with torch.no_grad():
        delta_ops.set_implementation("fused")
        expected = residual(state, direction, context)
        delta_ops.set_implementation("native")
        got = residual(state, direction, context)
    assert kernel_calls["projected_rewrite"] == 1
    assert got.stride() == expected.stride()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kernels_keep_out_of_autograd_and_of_hooked_projections(kernel_calls):
    residual = DDLDeltaResidual(tiny_config("ddl-cc"))
    state, direction = rewrite_inputs((1, 4), residual.value_proj.in_features, 4)[:2]
    context = torch.randn_like(direction)
    residual(state, direction, context).sum().backward()  # parameters need gradients: the autograd node
    assert residual.value_proj.weight.grad is not None
    assert all(kernel_calls[name] == 0 for name in NO_GRAD_KERNELS)
    assert kernel_calls["projected_rewrite_forward"] == kernel_calls["projected_rewrite_backward"] == 1
    seen = []
    residual.value_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        residual(state, direction, context)
    assert seen == [(1, 4, 4)] and kernel_calls["projected_rewrite"] == 0
    assert kernel_calls["rewrite"] == 1  # the rewrite alone still runs in C
    residual.zero_grad()
    residual(state, direction, context).sum().backward()  # the hook runs, then the rewrite alone in C
    assert seen == [(1, 4, 4)] * 2 and residual.value_proj.weight.grad is not None
    assert kernel_calls["projected_rewrite_forward"] == 1
    assert kernel_calls["rewrite_forward"] == kernel_calls["rewrite_backward"] == 1


@pytest.mark.parametrize("binding", ["ctypes", "extension"])
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_native_decoding_matches_the_reference(name, binding, kernel_calls, request):
    extension_calls = request.getfixturevalue("cpp_extension") if binding == "extension" else None
    model = perturbed_model(name)
    prompt = torch.randint(3, TEST_VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # left padding
    outputs = {}
    for implementation in ("reference", "native"):
        delta_ops.set_implementation(implementation)
        outputs[implementation] = model.generate(
            prompt,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    torch.testing.assert_close(outputs["native"].sequences, outputs["reference"].sequences)
    for got, expected in zip(outputs["native"].logits, outputs["reference"].logits):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    ran = dict(kernel_calls)
    if extension_calls is not None:  # decoding calls the extension's kernels straight, not through cpu_kernels
        assert all(kernel_calls[name] == 0 for name in extension_calls)
        ran |= extension_calls
    assert (ran["projected_rewrite"] > 0) == (model.config.residual_mode != "additive")
    assert (ran["channel_mix"] > 0) == model.config.expanded_state
    assert (ran["token_mix_step"] > 0) == model.config.uses_token_compressor
    assert (ran["expansion_step"] > 0) == model.config.uses_embedding_expansion


def test_the_library_is_built_once_into_the_cache(fresh_build):
    cpu_kernels.load()
    path = cpu_kernels.library_path()
    assert path.parent == fresh_build and sorted(fresh_build.iterdir()) == [path]  # no scratch folder left
    built = path.stat().st_mtime_ns
    cpu_kernels.load.cache_clear()
    cpu_kernels.load()
    assert path.stat().st_mtime_ns == built


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"], ids=["missing", "failing"])
def test_a_failed_build_names_the_fix_and_the_model_falls_back(compiler, fresh_build, monkeypatch):
    monkeypatch.setenv("CC", compiler)
    with pytest.raises(cpu_kernels.KernelBuildError, match=r"need a C compiler .*set_implementation\('fused'\)"):
        cpu_kernels.load()
    model = perturbed_model("ddl-cc")
    tokens = torch.randint(3, TEST_VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="Using the fused PyTorch operators instead"):
            got = model(tokens).logits
        delta_ops.set_implementation("fused")
        expected = model(tokens).logits
    torch.testing.assert_close(got, expected)
    assert list(fresh_build.iterdir()) == []


def test_inputs_the_kernels_cannot_take_fall_back_without_harm(kernel_calls):
    state = channel_major_state(2, 3, 1, 4)  # d = 1 against h of width 8: the reference broadcasts
    direction, target, beta = torch.randn(2, 3, 8), torch.randn(2, 3, 4), torch.rand(2, 3, 1)
    with torch.no_grad():
        got = delta_ops.rewrite_function("delta")(state, direction, target, beta)
    torch.testing.assert_close(got, delta_update(state, direction, target, beta))
    assert kernel_calls["rewrite"] == 0
    assert cpu_kernels.rewrite(state, direction, target, beta, 1e-5, True) is None
    wide_state = channel_major_state(2, 3, 8, 4)
    assert cpu_kernels.rewrite(wide_state, direction, target[0], beta, 1e-5, True) is None  # target (3, 4)
    assert cpu_kernels.rewrite(wide_state[0, 0, 0], direction[0, 0, 0], target[0, 0], beta[0, 0], 1e-5, True) is None


def test_fake_tensors_take_the_pytorch_operators():
    from torch._subclasses.fake_tensor import FakeTensorMode

    residual = DDLDeltaResidual(tiny_config("ddl-cc"))
    hidden = residual.value_proj.in_features
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        state = mode.from_tensor(channel_major_state(1, 2, hidden, 4))
        direction = mode.from_tensor(torch.randn(1, 2, hidden))
        out = residual(state, direction, direction)
    assert out.shape == state.shape  # a data pointer of a fake tensor would have crashed the process


@pytest.mark.parametrize(
    "change",
    ["gate hidden layer", "65 channels", "hook on the gate", "autocast"],
)
def test_the_projected_rewrite_steps_aside_where_it_does_not_apply(change, kernel_calls):
    overrides = {"beta_hidden_size": 8} if change == "gate hidden layer" else {}
    if change == "65 channels":
        overrides["value_channels"] = cpu_kernels.MAX_CHANNELS + 1
    config = tiny_config("ddl-cc", **overrides)
    residual = DDLDeltaResidual(config)
    if change == "hook on the gate":
        residual.beta_proj.register_forward_pre_hook(lambda module, args: None)
    state, direction = rewrite_inputs((1, 3), config.hidden_size, config.value_channels)[:2]
    context = torch.randn_like(direction)
    outputs = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=change == "autocast"):
        for implementation in ("fused", "native"):
            delta_ops.set_implementation(implementation)
            outputs[implementation] = residual(state, direction, context)
    assert kernel_calls["projected_rewrite"] == 0
    torch.testing.assert_close(outputs["native"], outputs["fused"], rtol=1e-5, atol=1e-5)


def test_a_projection_weight_that_is_not_a_parameter_is_still_read(kernel_calls):
    # the kernels read plain projections' weights from their parameter dictionaries; a weight set as a plain tensor
    # attribute (not a parameter) is read as an attribute
    residual = DDLDeltaResidual(tiny_config("ddl-cc")).requires_grad_(False)
    state, direction = rewrite_inputs((1, 3), residual.value_proj.in_features, 4)[:2]
    weight = torch.randn_like(residual.value_proj.weight)
    del residual.value_proj.weight
    residual.value_proj.weight = weight
    with torch.no_grad():
        got = residual(state, direction, direction)
        delta_ops.set_implementation("reference")
        expected = residual(state, direction, direction)
    assert kernel_calls["projected_rewrite"] == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_kernels_keep_gradients_of_inputs_of_a_frozen_model(kernel_calls):
    residual = DDLDeltaResidual(tiny_config("ddl-cc")).requires_grad_(False)
    state, direction = rewrite_inputs((1, 3), residual.value_proj.in_features, 4)[:2]
    residual(state, direction, direction)  # grad enabled, nothing requires a gradient: the kernel
    assert kernel_calls["projected_rewrite"] == 1
    direction.requires_grad_()
    residual(state, direction, direction).sum().backward()  # e.g. attributions: autograd
    assert kernel_calls["projected_rewrite"] == 1 and direction.grad is not None


def test_traced_and_compiled_models_do_not_bake_in_a_kernel_call(kernel_calls):
    residual = DDLDeltaResidual(tiny_config("ddl-cc")).eval().requires_grad_(False)
    hidden = residual.value_proj.in_features
    first, second = (rewrite_inputs((1, 3), hidden, 4)[:2] for _ in range(2))
    with torch.no_grad():
        expected = residual(second[0], second[1], second[1])
        calls = kernel_calls["projected_rewrite"]
        traced = torch.jit.trace(residual, (first[0], first[1], first[1]), check_trace=False)
        compiled = torch.compile(residual, backend="eager", fullgraph=True)
        compiled(first[0], first[1], first[1])
        for model in (traced, compiled):
            torch.testing.assert_close(model(second[0], second[1], second[1]), expected, rtol=1e-5, atol=1e-5)
    assert kernel_calls["projected_rewrite"] == calls


def test_a_compiler_command_with_arguments_builds(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "env cc")
    cpu_kernels.load()
    assert cpu_kernels.library_path().is_file()


def test_a_missing_source_falls_back_with_a_warning(fresh_build, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "SOURCE", fresh_build / "missing.c")
    with pytest.raises(cpu_kernels.KernelBuildError, match="missing.c"):
        cpu_kernels.load()
    with pytest.warns(RuntimeWarning, match="Using the fused PyTorch operators instead"), torch.no_grad():
        perturbed_model("ddl-scalar")(torch.tensor([[5, 6, 7]]))


def test_results_are_float32_cpu_tensors_whatever_the_default_dtype():
    state, weight = channel_major_state(1, 2, 8, 3), torch.randn(8, 3)
    expected = channel_mix(state, weight)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = cpu_kernels.channel_mix(state, weight)
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------------------------
# The C++ extension (`cpu_extension.cpp`): the decoding kernels called with tensors instead of through ctypes
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def built_extension():
    """The extension, built once into this session's cache folder (about 30 s)."""
    return cpu_kernels.build_extension()


@pytest.fixture
def cpp_extension(built_extension, monkeypatch) -> dict[str, int]:
    """The model's decoding kernels run through the extension while the test runs; counts its calls that returned a
    result."""
    calls = {"projected_rewrite": 0, "channel_mix": 0, "expansion_step": 0, "token_mix_step": 0}

    def counting(name: str):
        def counted(*args):
            result = getattr(built_extension, name)(*args)
            calls[name] += result is not None
            return result

        return counted

    counted = SimpleNamespace(**{name: counting(name) for name in calls})
    monkeypatch.setattr(cpu_kernels, "extension", lambda: counted)
    return calls


def ctypes_result(kernel: str, *args):
    """`cpu_kernels.<kernel>(*args)` through ctypes (conftest.py keeps the extension off outside its own tests)."""
    cpu_kernels.extension.cache_clear()
    assert os.environ[cpu_kernels.EXTENSION_VARIABLE] == "0" and cpu_kernels.extension() is None
    return getattr(cpu_kernels, kernel)(*args)


def projection_inputs(lead, hidden, channels, value_bias=True):
    state, direction = rewrite_inputs(lead, hidden, channels)[:2]
    weights = [torch.randn(channels, hidden), torch.randn(channels) if value_bias else None]
    return [state, direction, torch.randn(*lead, hidden), *weights, torch.randn(1, hidden), torch.randn(1)]


@pytest.mark.parametrize("erase", [True, False])
@pytest.mark.parametrize("value_scale", [None, 2.0])
@pytest.mark.parametrize("lead", [(1, 1), (3, 40)], ids=["one-token", "120-tokens"])
@pytest.mark.parametrize("channels", [1, 4])
def test_the_extension_equals_the_ctypes_kernels(erase, value_scale, lead, channels, built_extension, two_threads):
    torch.manual_seed(0)
    inputs = projection_inputs(lead, 24, channels, value_bias=value_scale is not None)
    got = built_extension.projected_rewrite(*inputs, 1e-5, erase, value_scale)
    expected = ctypes_result("projected_rewrite", *inputs, 1e-5, erase, value_scale)
    assert torch.equal(got, expected) and got.stride() == expected.stride()
    if channels > 1:
        weight = torch.randn(24, channels)
        assert torch.equal(
            built_extension.channel_mix(inputs[0], weight), ctypes_result("channel_mix", inputs[0], weight)
        )


def test_the_extension_steps_aside_where_the_ctypes_kernels_do(built_extension):
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    state, direction, context, *weights = projection_inputs((1, 2), 8, 3)
    value_weight, value_bias, gate_weight, gate_bias = weights
    cases = {
        "row-major state": [state.contiguous(), direction, context],
        "bfloat16 state": [state.bfloat16(), direction, context],
        "meta state": [state.to("meta"), direction, context],
        "lazily negated state": [torch.randn(1, 2, 3, 8).neg().mT._neg_view(), direction, context],
        "non-contiguous direction": [state, torch.randn(1, 8, 2).mT, context],
        "context of another shape": [state, direction, context[:, :1]],
    }
    for name, (case_state, case_direction, case_context) in cases.items():
        args = (case_state, case_direction, case_context, value_weight, value_bias, gate_weight, gate_bias, 1e-5, True)
        assert built_extension.projected_rewrite(*args, None) is None, name
        assert ctypes_result("projected_rewrite", *args, None) is None, name
    wide = projection_inputs((1, 2), 8, 65)
    assert built_extension.projected_rewrite(*wide, 1e-5, True, None) is None  # 65 channels
    assert (
        built_extension.projected_rewrite(
            state, direction, context, value_weight[:2], None, gate_weight, gate_bias, 1e-5, True, None
        )
        is None
    )
    assert built_extension.channel_mix(state, torch.randn(8, 4)) is None
    assert built_extension.channel_mix(state.contiguous(), torch.randn(8, 3)) is None
    assert built_extension.channel_mix(state.double(), torch.randn(8, 3, dtype=torch.float64)) is None
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # a fake tensor has no data to point to
        fake = mode.from_tensor(state)
        assert built_extension.channel_mix(fake, torch.randn(8, 3)) is None
        assert built_extension.projected_rewrite(fake, direction, context, *weights, 1e-5, True, None) is None


DECODING_CHANGES = ["none", "fused implementation", "vmap", "forward AD", "autocast", "subclass", "autograd"]


def _decoding_operators(change: str):
    """The four decoding operators the model calls straight into the extension, on one token's inputs, run under
    `change` (a setting in which none of them may call a kernel, except where the test says)."""
    torch.manual_seed(0)
    residual = DDLDeltaResidual(tiny_config("ddl-cc"))
    hidden = residual.value_proj.in_features
    state, direction = rewrite_inputs((1, 1), hidden, 4)[:2]
    context, mix_weight = torch.randn_like(direction), torch.randn(hidden, 4)
    window, conv_weight = torch.randn(1, hidden, 3).transpose(1, 2), torch.randn(hidden * 4, 1, 3)

    history, token_weight, read = torch.randn(1, 2, hidden, 4), torch.randn(hidden * 4, 1, 3), torch.randn(4)

    def run(state, direction, window):
        return (
            residual(state, direction, context),
            delta_ops.fused_channel_mix(state, mix_weight),
            delta_ops.fused_expand_embeddings(window, conv_weight),
            delta_ops.fused_token_mix(state, token_weight, read, history),
        )

    if change == "subclass":
        state, direction, window = (t.as_subclass(SubclassedTensor) for t in (state, direction, window))
    if change == "vmap":
        with torch.no_grad():
            return [out[0] for out in torch.func.vmap(run)(state[None], direction[None], window[None])]
    if change == "forward AD":
        with forward_ad.dual_level(), torch.no_grad():
            dual = forward_ad.make_dual(state, torch.ones_like(state))
            return [forward_ad.unpack_dual(out).primal for out in run(dual, direction, window)]
    if change == "autograd":
        return [out.detach() for out in run(state.requires_grad_(), direction, window.requires_grad_())]
    if change == "fused implementation":
        delta_ops.set_implementation("fused")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=change == "autocast"):
        return [out.float() for out in run(state, direction, window)]


class SubclassedTensor(torch.Tensor):
    """A tensor subclass: its `__torch_function__` must not be bypassed by a kernel."""


@pytest.mark.parametrize("change", DECODING_CHANGES)
def test_decoding_calls_the_extension_only_where_it_may(change, cpp_extension, kernel_calls):
    got = _decoding_operators(change)
    if change in ("none", "autocast"):  # the reads and the expansion keep the state's dtype under autocast
        calls = {"projected_rewrite": int(change == "none"), "channel_mix": 1, "expansion_step": 1}
        assert cpp_extension == {**calls, "token_mix_step": 1}
    elif change == "autograd":  # CC's read's forward, inside its autograd node
        assert cpp_extension == {"projected_rewrite": 0, "channel_mix": 1, "expansion_step": 0, "token_mix_step": 0}
    else:
        assert cpp_extension == dict.fromkeys(cpp_extension, 0)
    delta_ops.set_implementation("fused")  # the same, in PyTorch operators only
    expected = _decoding_operators(change)
    for got_tensor, expected_tensor in zip(got, expected):
        torch.testing.assert_close(got_tensor, expected_tensor, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("binding", ["ctypes", "extension"])
def test_make_fx_traces_the_pytorch_operators(binding, kernel_calls, request):
    # a dispatch mode (here make_fx's) sees no C call: a traced kernel would be baked into the graph as a constant
    from torch.fx.experimental.proxy_tensor import make_fx

    extension_calls = request.getfixturevalue("cpp_extension") if binding == "extension" else {}
    residual = DDLDeltaResidual(tiny_config("ddl-cc"))
    hidden = residual.value_proj.in_features
    inputs = [rewrite_inputs((1, 2), hidden, 4)[:2] for _ in range(2)]
    with torch.no_grad():
        traced = make_fx(lambda state, direction: residual(state, direction, direction))(*inputs[0])
        assert sum(kernel_calls.values()) + sum(extension_calls.values()) == 0
        got, expected = traced(*inputs[1]), residual(*inputs[1], inputs[1][1])
    assert sum(kernel_calls.values()) + sum(extension_calls.values()) == 1  # the eager call
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_built_extension_is_found_and_can_be_turned_off(built_extension, monkeypatch):
    monkeypatch.delenv(cpu_kernels.EXTENSION_VARIABLE)  # as for a user: neither asked for nor refused
    cpu_kernels.extension.cache_clear()
    try:
        assert cpu_kernels.extension() is not None  # built into this session's cache folder
        monkeypatch.setenv(cpu_kernels.EXTENSION_VARIABLE, "0")
        cpu_kernels.extension.cache_clear()
        assert cpu_kernels.extension() is None
    finally:
        cpu_kernels.extension.cache_clear()


def test_a_failed_extension_build_warns_and_the_ctypes_kernels_run(fresh_build, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    monkeypatch.setenv(cpu_kernels.EXTENSION_VARIABLE, "1")
    cpu_kernels.extension.cache_clear()
    try:
        with pytest.warns(
            RuntimeWarning, match="C\\+\\+ extension could not be built.*DDL_TRANSFORMERS_CPU_EXTENSION=0"
        ):
            assert cpu_kernels.extension() is None
        state, direction, context, *weights = projection_inputs((1, 1), 8, 4)
        assert cpu_kernels.projected_rewrite(state, direction, context, *weights, 1e-5, True, None) is not None
    finally:
        cpu_kernels.extension.cache_clear()


def test_the_extension_build_finds_the_virtual_environments_ninja(monkeypatch, tmp_path):
    """`make setup` runs `.venv/bin/python` without `.venv/bin` on `PATH`, where pip put `ninja`: the build looks
    there first, and `PATH` is as it was afterwards."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("DDL_TRANSFORMERS_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin")
    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda *args, **kwargs: seen.append(os.environ["PATH"]) or "built")
    assert cpu_kernels.build_extension() == "built"
    assert seen == [os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin"])]
    assert os.environ["PATH"] == "/usr/bin"


def _layout_cases() -> dict[str, tuple]:
    """Inputs of every kind the two bindings must treat alike: `(kernel, args)` for the projected rewrite, the channel
    mix and the expansion step."""
    torch.manual_seed(0)
    hidden, channels = 8, 3
    state, direction, context, value_weight, value_bias, gate_weight, gate_bias = projection_inputs((2, 3), 8, 3)
    base = {"state": state, "direction": direction, "context": context, "value_weight": value_weight}
    base |= {"value_bias": value_bias, "gate_weight": gate_weight, "gate_bias": gate_bias}
    scalar = {"state": torch.randn(2, 3, hidden), "value_weight": torch.randn(1, hidden), "value_bias": torch.randn(1)}
    changes = {
        "as built": {},
        "no value bias": {"value_bias": None},
        "scalar state": scalar,
        "non-contiguous scalar state": {**scalar, "state": torch.randn(2, hidden, 3).mT},
        "0-dim tensors": {"state": torch.tensor(1.0), "direction": torch.tensor(1.0), "context": torch.tensor(1.0)},
        "no tokens": {"state": channel_major_state(0, 3, hidden, 3), "direction": torch.randn(0, 3, hidden)},
        "64 channels": {"state": channel_major_state(2, 3, hidden, 64), "value_weight": torch.randn(64, hidden)},
        "state at an offset": {"state": channel_major_state(3, 3, hidden, channels)[1:]},
        "transposed value weight": {"value_weight": torch.randn(hidden, channels).t()},
        "strided value bias": {"value_bias": torch.randn(channels, 2)[:, 0]},
        "value bias of another size": {"value_bias": torch.randn(channels + 1)},
        "gate weight (2, d)": {"gate_weight": torch.randn(2, hidden)},
        "0-dim gate bias": {"gate_bias": torch.tensor(0.5)},
        "broadcast gate weight": {"gate_weight": torch.randn(1, 1).expand(1, hidden)},
        "broadcast context": {"context": torch.randn(hidden).expand(2, 3, hidden)},
        "broadcast channels": {"state": torch.randn(2, 3, hidden, 1).expand(2, 3, hidden, channels)},
        "lazily negated value weight": {"value_weight": torch._neg_view(value_weight)},
        "float64": {name: tensor.double() for name, tensor in base.items()},
    }
    cases = {}
    for name, change in changes.items():
        inputs = {**base, **change}
        if name == "no tokens":
            inputs["context"] = torch.randn(0, 3, hidden)
        if name == "64 channels":
            inputs["value_bias"] = torch.randn(64)
        cases[f"projected rewrite, {name}"] = ("projected_rewrite", (*inputs.values(), 1e-5, True, 2.0))
    weight = torch.randn(hidden, channels)
    mixes = {
        "as built": (state, weight),
        "one token": (channel_major_state(hidden, channels), weight),
        "transposed weight": (state, torch.randn(channels, hidden).t()),
        "weight at an offset": (state, torch.randn(hidden + 1, channels)[1:]),
        "broadcast weight": (state, torch.randn(1, channels).expand(hidden, channels)),
        "row-major state": (state.contiguous(), weight),
        "broadcast channels": (torch.randn(2, 3, hidden, 1).expand(2, 3, hidden, channels), weight),
        "no features": (channel_major_state(2, 3, 0, channels), torch.randn(0, channels)),
        "lazily negated state": (torch._neg_view(state), weight),
        "float64 weight": (state, weight.double()),
    }
    cases |= {f"channel mix, {name}": ("channel_mix", args) for name, args in mixes.items()}
    window, conv_weight = torch.randn(2, 3, hidden), torch.randn(hidden * channels, 1, 3)
    steps = {
        "as built": (window, conv_weight),
        "the cache's layout": (torch.randn(2, hidden, 3).transpose(1, 2), conv_weight),
        "window at an offset": (torch.randn(3, 3, hidden)[1:], conv_weight),
        "broadcast window": (torch.randn(1, 3, hidden).expand(2, -1, -1), conv_weight),
        "window of K - 1": (window[:, 1:], conv_weight),
        "weight of another width": (window, torch.randn(hidden * channels + 1, 1, 3)),
        "strided weight": (window, torch.randn(hidden * channels, 1, 6)[..., ::2]),
        "no features": (torch.randn(2, 3, 0), torch.randn(0, 1, 3)),
        "lazily negated window": (torch._neg_view(window), conv_weight),
        "float64 window": (window.double(), conv_weight),
        "2-d window": (window[0], conv_weight),
    }
    cases |= {f"expansion step, {name}": ("expansion_step", args) for name, args in steps.items()}
    state, token_weight, read = (
        channel_major_state(2, 1, hidden, channels),
        torch.randn(hidden * channels, 1, 3),
        weight[0],
    )
    history = torch.randn(2, channels * hidden, 2).transpose(1, 2).unflatten(-1, (channels, hidden)).transpose(-1, -2)
    token_steps = {
        "the cache's layout": (state, token_weight, read, history),
        "contiguous history": (state, token_weight, read, history.contiguous()),
        "broadcast history": (state, token_weight, read, history[:1].expand(2, -1, -1, -1)),
        "history of K - 2": (state, token_weight, read, history[:, 1:]),
        "row-major state": (state.contiguous(), token_weight, read, history),
        "two tokens": (channel_major_state(2, 2, hidden, channels), token_weight, read, history),
        "strided read": (state, token_weight, torch.randn(2 * channels)[::2], history),
        "strided weight": (state, torch.randn(hidden * channels, 1, 6)[..., ::2], read, history),
        "weight of another width": (state, torch.randn(hidden * channels + 1, 1, 3), read, history),
        "float64 history": (state, token_weight, read, history.double()),
        "lazily negated history": (state, token_weight, read, torch._neg_view(history)),
    }
    cases |= {f"token mix step, {name}": ("token_mix_step", args) for name, args in token_steps.items()}
    return cases


LAYOUT_CASES = _layout_cases()


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_the_extension_takes_what_the_ctypes_kernels_take(case, built_extension):
    kernel, args = LAYOUT_CASES[case]

    def outcome(call):
        try:
            return call()
        except (RuntimeError, IndexError) as error:
            return type(error)

    got = outcome(lambda: getattr(built_extension, kernel)(*args))
    expected = outcome(lambda: ctypes_result(kernel, *args))
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected) and got.stride() == expected.stride()
    else:
        assert got == expected  # None (the kernel steps aside) or the same error


def test_a_built_extension_loads_without_its_build_tools(built_extension, tmp_path):
    # a build killed while it held its lock leaves the lock file behind; loading must not wait for it
    lock = cpu_kernels._extension_dir(cpu_kernels.extension_name()) / "lock"
    lock.touch()
    try:
        script = "from ddl_transformers import cpu_kernels; assert cpu_kernels.extension() is not None"
        env = {**os.environ, "PATH": str(tmp_path)}  # no compiler, no ninja
        env.pop(cpu_kernels.EXTENSION_VARIABLE)
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    finally:
        lock.unlink()


def test_a_missing_extension_source_leaves_the_ctypes_kernels_alone(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "EXTENSION_SOURCE", tmp_path / "missing.cpp")
    monkeypatch.delenv(cpu_kernels.EXTENSION_VARIABLE)
    cpu_kernels.extension.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not asked for: no warning
            assert cpu_kernels.extension() is None
        state, direction, context, *weights = projection_inputs((1, 1), 8, 4)
        assert cpu_kernels.projected_rewrite(state, direction, context, *weights, 1e-5, True, None) is not None
        monkeypatch.setenv(cpu_kernels.EXTENSION_VARIABLE, "1")
        cpu_kernels.extension.cache_clear()
        with pytest.warns(RuntimeWarning, match="missing.cpp"):
            assert cpu_kernels.extension() is None
    finally:
        cpu_kernels.extension.cache_clear()
