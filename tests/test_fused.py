"""The fused operators against the reference ones: values, gradients, layouts, and whole models."""

import pytest
import torch
from conftest import ALL_PRESETS, TEST_VOCAB, logits_and_grads, perturbed_model

from ddl_transformers import delta_ops
from ddl_transformers.delta_ops import (
    channel_mix,
    delta_update,
    fused_channel_mix,
    fused_delta_update,
    fused_token_mix,
    fused_write_only_update,
    token_mix,
    write_only_update,
)

D, DV = 16, 4
PAIRS = {"delta": (delta_update, fused_delta_update), "write_only": (write_only_update, fused_write_only_update)}
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def rewrite_inputs(value_channels, dtype, batch=(3, 5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    state_shape = (*batch, D) if value_channels == 1 else (*batch, D, value_channels)
    state = torch.randn(state_shape, generator=generator).to(dtype)
    direction = torch.randn(*batch, D, generator=generator).to(dtype)
    target = torch.randn(*batch, value_channels, generator=generator).to(dtype)
    beta = 2 * torch.rand(*batch, 1, generator=generator, dtype=torch.float64)
    beta = beta.to(torch.float64 if dtype == torch.float64 else torch.float32)  # the model's gate is float32
    return [t.requires_grad_() for t in (state, direction, target, beta)]


def values_and_grads(fn, inputs, seed=1):
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return out, torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("mode", list(PAIRS))
@pytest.mark.parametrize("value_channels", [1, DV])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_rewrite_matches_reference(mode, value_channels, dtype):
    reference, fused = PAIRS[mode]
    inputs = rewrite_inputs(value_channels, dtype)
    expected, expected_grads = values_and_grads(reference, inputs)
    out, grads = values_and_grads(fused, inputs)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    for grad, expected_grad, tensor in zip(grads, expected_grads, inputs):
        assert grad.dtype == tensor.dtype
        torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("mode", list(PAIRS))
def test_rewrite_without_grad_matches_reference_in_float64(mode):
    reference, fused = PAIRS[mode]
    for value_channels in (1, DV):
        inputs = [t.detach() for t in rewrite_inputs(value_channels, torch.float64)]
        with torch.no_grad():
            torch.testing.assert_close(fused(*inputs), reference(*inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", list(PAIRS))
def test_bfloat16_fused_rewrite_is_close_to_float32(mode):
    reference, fused = PAIRS[mode]
    inputs = rewrite_inputs(DV, torch.float32)
    expected, expected_grads = values_and_grads(reference, inputs)
    # bfloat16 state, direction and target; the gate stays float32 as in the model
    low = [t.detach().bfloat16().requires_grad_() for t in inputs[:3]] + [inputs[3]]
    out, grads = values_and_grads(fused, low)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.float(), expected_grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("value_channels", [1, DV])
def test_fused_gradcheck_float64(value_channels):
    inputs = rewrite_inputs(value_channels, torch.float64, batch=(2,))
    assert torch.autograd.gradcheck(fused_delta_update, inputs)
    assert torch.autograd.gradcheck(fused_write_only_update, inputs)


@pytest.mark.parametrize("value_channels", [1, DV])
def test_fused_zero_direction_is_finite(value_channels):
    state, direction, target, beta = rewrite_inputs(value_channels, torch.float32)
    direction = torch.zeros_like(direction).requires_grad_()
    out, grads = values_and_grads(fused_delta_update, [state, direction, target, beta])
    torch.testing.assert_close(out, state)
    assert all(torch.isfinite(grad).all() for grad in grads)


def test_fused_state_is_channel_major_and_any_input_layout_works():
    state, direction, target, beta = rewrite_inputs(DV, torch.float32)
    expected = delta_update(state, direction, target, beta)
    for layout in (state, state.transpose(-1, -2).contiguous().transpose(-1, -2), state[..., :1].expand_as(state)):
        out = fused_delta_update(layout, direction, target, beta)
        assert out.transpose(-1, -2).is_contiguous()
        torch.testing.assert_close(out, delta_update(layout, direction, target, beta), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_delta_update(state, direction, target, beta), expected)


def test_fused_broadcasting_shapes_fall_back_to_the_reference():
    # one state matrix (d_v = d) rewritten along a single direction, as in the Householder check
    direction = torch.randn(D, dtype=torch.float64)
    inputs = (torch.eye(D, dtype=torch.float64), direction, torch.zeros(D, dtype=torch.float64), torch.tensor([2.0]))
    torch.testing.assert_close(fused_delta_update(*inputs), delta_update(*inputs))
    no_batch = [t.detach()[0, 0] for t in rewrite_inputs(DV, torch.float64)]
    torch.testing.assert_close(fused_delta_update(*no_batch), delta_update(*no_batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_channel_and_token_mix_match_reference(dtype):
    generator = torch.Generator().manual_seed(0)
    kernel = 3
    window = torch.randn(2, kernel - 1 + 7, D, DV, generator=generator).to(dtype).requires_grad_()
    mix_weight = torch.randn(D, DV, generator=generator).requires_grad_()
    conv_weight = torch.randn(D * DV, 1, kernel, generator=generator).requires_grad_()
    read = torch.randn(DV, generator=generator).requires_grad_()
    tol = TOLERANCES[dtype] * 3
    cases = [
        (channel_mix, fused_channel_mix, (window, mix_weight)),
        (token_mix, fused_token_mix, (window, conv_weight, read)),
    ]
    for reference, fused, inputs in cases:
        expected, expected_grads = values_and_grads(reference, inputs)
        out, grads = values_and_grads(fused, inputs)
        assert out.shape == expected.shape and out.dtype == dtype
        torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("seq_len", [1, 3])
def test_fused_token_mix_with_history_matches_reference(seq_len):
    generator = torch.Generator().manual_seed(0)
    kernel = 4
    states = torch.randn(2, seq_len, D, DV, generator=generator)
    history = torch.randn(2, kernel - 1, D, DV, generator=generator)
    conv_weight = torch.randn(D * DV, 1, kernel, generator=generator)
    read = torch.randn(DV, generator=generator)
    expected = token_mix(states, conv_weight, read, history)
    torch.testing.assert_close(fused_token_mix(states, conv_weight, read, history), expected, rtol=1e-5, atol=1e-5)
    # zeros as history are the start of the sequence
    torch.testing.assert_close(
        fused_token_mix(states, conv_weight, read), token_mix(states, conv_weight, read, torch.zeros_like(history))
    )


@pytest.mark.parametrize("shape", [(2, 3, D, DV), (0, 3, D, DV), (7, D, DV), (D, DV)])
@pytest.mark.parametrize("channel_major", [True, False])
def test_fused_channel_mix_gradients_for_any_rank_and_layout(shape, channel_major):
    generator = torch.Generator().manual_seed(0)
    if channel_major:
        state = torch.randn(*shape[:-2], DV, D, generator=generator, dtype=torch.float64).transpose(-1, -2)
    else:
        state = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight = torch.randn(D, DV, generator=generator, dtype=torch.float64)
    inputs = (state.requires_grad_(), weight.requires_grad_())
    assert torch.autograd.gradcheck(fused_channel_mix, inputs)
    grad_out = torch.randn(shape[:-1], generator=generator, dtype=torch.float64)
    expected = torch.autograd.grad(channel_mix(*inputs), inputs, grad_out)
    for grad, expected_grad in zip(torch.autograd.grad(fused_channel_mix(*inputs), inputs, grad_out), expected):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("seq_len", "kernel", "history_len"), [(6, 4, None), (6, 4, 3), (3, 5, None), (2, 6, 5)])
@pytest.mark.parametrize("needs_grad", ["both", "states", "weights"])
def test_fused_token_mix_training_backward_is_exact(seq_len, kernel, history_len, needs_grad):
    # the CPU training path: its own backward (the convolution's input gradient, a dot product per tap for the
    # kernel), also for sequences shorter than the kernel
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "states": torch.randn(2, seq_len, 5, 3, generator=generator, dtype=torch.float64),
        "conv_weight": torch.randn(15, 1, kernel, generator=generator, dtype=torch.float64),
        "read": torch.randn(3, generator=generator, dtype=torch.float64),
    }
    if history_len is not None:
        tensors["history"] = torch.randn(2, history_len, 5, 3, generator=generator, dtype=torch.float64)
    names = {"both": ["states", "conv_weight", "read"], "states": ["states"], "weights": ["conv_weight", "read"]}
    inputs = [tensors[name].requires_grad_() for name in names[needs_grad]]

    def mix(*grad_inputs):
        return fused_token_mix(**{**tensors, **dict(zip(names[needs_grad], grad_inputs))})

    out = mix(*inputs)
    assert type(out.grad_fn).__name__ == "_FusedTokenConvBackward"
    assert torch.autograd.gradcheck(mix, inputs)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    expected = torch.autograd.grad(token_mix(**tensors), inputs, grad_out)
    for grad, expected_grad in zip(torch.autograd.grad(out, inputs, grad_out), expected):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


def test_one_place_chooses_the_implementation(reference_operators):
    assert delta_ops.rewrite_function("delta") is delta_update
    assert delta_ops.channel_mix_function() is channel_mix
    delta_ops.set_implementation("fused")
    assert delta_ops.rewrite_function("write_only") is fused_write_only_update
    assert delta_ops.token_mix_function() is fused_token_mix
    with pytest.raises(ValueError, match="'cuda_graphs'; allowed values are"):
        delta_ops.set_implementation("cuda_graphs")


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_fused_model_equals_reference_model(name, reference_operators):
    model = perturbed_model(name).train()
    tokens = torch.randint(3, TEST_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    ref_logits, ref_grads = logits_and_grads(model, tokens)
    with torch.no_grad():
        ref_masked = model(tokens, attention_mask=mask).logits
    delta_ops.set_implementation("fused")
    logits, grads = logits_and_grads(model, tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, attention_mask=mask).logits, ref_masked, rtol=1e-5, atol=1e-5)
    for param_name, grad in grads.items():
        scale = ref_grads[param_name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[param_name], rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=param_name)


def _compiled_logits_match(name: str, backend: str) -> None:
    torch._dynamo.reset()
    model = perturbed_model(name, num_hidden_layers=1).train()
    tokens = torch.randint(3, TEST_VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    expected_logits, expected_grads = logits_and_grads(model, tokens)
    model.zero_grad()
    out = torch.compile(model, backend=backend, fullgraph=True)(tokens, labels=tokens)  # one graph: no break
    out.loss.backward()
    torch.testing.assert_close(out.logits, expected_logits, rtol=1e-4, atol=1e-4)
    for param_name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[param_name], rtol=1e-3, atol=1e-4, msg=param_name)


@pytest.mark.parametrize(
    "name", [name if name == "ddl-tc" else pytest.param(name, marks=pytest.mark.slow) for name in ALL_PRESETS]
)
def test_torch_compile_traces_every_preset(name):
    # forward and backward through AOTAutograd; ddl-tc (rewrite, token convolution, EC) runs by default
    _compiled_logits_match(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_torch_compile_inductor_every_preset(name):
    _compiled_logits_match(name, "inductor")


@pytest.mark.parametrize("name", ["ddl-scalar", "ddl-cc", "ddl-tc", "write-only"])
def test_fused_model_under_autocast(name):
    # Trainer's bf16 (autocast): float32 weights and states; backward inside or outside the autocast region
    model = perturbed_model(name).train()
    tokens = torch.randint(3, TEST_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    expected, expected_grads = logits_and_grads(model, tokens)
    for backward_inside in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, labels=tokens)
            if backward_inside:
                out.loss.backward()
        if not backward_inside:
            out.loss.backward()
        torch.testing.assert_close(out.logits.float(), expected, rtol=5e-2, atol=5e-2)
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        reference = torch.cat([g.flatten() for g in expected_grads.values()])
        assert ((grads - reference).norm() / reference.norm()).item() < 5e-2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        generated = model.generate(tokens[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["ddl-cc", "ddl-tc", "write-only"])
def test_reference_and_fused_states_agree_under_autocast(name, dtype):
    # mixed precision keeps float32 states with either implementation, in training and in cached decoding
    model = perturbed_model(name).train()
    tokens = torch.randint(3, TEST_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, state_dtypes = {}, []
    hook = model.model.layers[0].register_forward_pre_hook(lambda module, args: state_dtypes.append(args[0].dtype))
    for implementation in ("fused", "reference"):
        delta_ops.set_implementation(implementation)
        try:
            with torch.autocast("cpu", dtype=dtype):
                logits[implementation] = model(tokens).logits.float()
                with torch.no_grad():
                    out = model(tokens[:, :6], use_cache=True)
                    model(tokens[:, 6:7], cache=out.cache, use_cache=True)
        finally:
            delta_ops.set_implementation("fused")
    hook.remove()
    assert state_dtypes == [torch.float32] * 6
    error = (logits["reference"] - logits["fused"]).norm() / logits["fused"].norm()
    assert error.item() < 2e-2, error


def test_fused_rewrite_broadcasts_a_shared_target_and_gate_like_the_reference():
    state, direction, target, beta = (t.detach() for t in rewrite_inputs(DV, torch.float64))
    shared_target, shared_beta = target[..., :1], beta.mean()  # (..., 1) for d_v = 4 channels, and a 0-d gate
    for inputs in ((state, direction, shared_target, beta), (state, direction, target, shared_beta)):
        expected = delta_update(*inputs)
        torch.testing.assert_close(fused_delta_update(*inputs), expected)
        with torch.enable_grad():
            leaves = [t.clone().requires_grad_() for t in inputs]
            torch.testing.assert_close(fused_delta_update(*leaves), expected)
