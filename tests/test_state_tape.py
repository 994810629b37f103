"""States rebuilt in backward (`state_tape`) and the fused embedding expansion, against kept states and the reference."""

from contextlib import nullcontext
from unittest.mock import patch

import pytest
import torch
from conftest import TEST_VOCAB, perturbed_model
from torch.multiprocessing.reductions import StorageWeakRef

from ddl_transformers import DDLModel, delta_ops, state_tape
from ddl_transformers.delta_ops import expand_embeddings, fused_delta_update, fused_expand_embeddings

REBUILT_PRESETS = ["ddl-scalar", "ddl-cc", "ddl-cc-noec", "ddl-tc", "write-only"]


@pytest.fixture
def reference_operators():
    delta_ops.set_implementation("reference")
    yield
    delta_ops.set_implementation("fused")


def tokens(batch=2, seq_len=10, seed=0):
    return torch.randint(3, TEST_VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def layer_outputs_alive_after_forward(model, input_ids) -> tuple[list[bool], torch.Tensor]:
    """Run a training forward; report which decoder-layer outputs' memory is still held while the graph is kept."""
    refs = []
    hooks = [
        layer.register_forward_hook(lambda module, args, output: refs.append(StorageWeakRef(output.untyped_storage())))
        for layer in model.model.layers
    ]
    try:
        loss = model(input_ids, labels=input_ids).loss
    finally:
        for hook in hooks:
            hook.remove()
    return [not ref.expired() for ref in refs], loss


def gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("name", REBUILT_PRESETS)
def test_forward_keeps_no_intermediate_state_and_gradients_match(name):
    model = perturbed_model(name, num_hidden_layers=3).double().train()
    input_ids = tokens()
    with patch.object(DDLModel, "_state_recording", lambda self, state: nullcontext()):
        kept, loss = layer_outputs_alive_after_forward(model, input_ids)
    assert kept[:-1] == [True, True], "without the tape, autograd keeps the states for backward"
    expected = gradients(model, loss)
    kept, loss = layer_outputs_alive_after_forward(model, input_ids)
    assert kept[:-1] == [False, False], "with it, only the last state is kept; the others are rebuilt in backward"
    rebuilt = gradients(model, loss)
    assert rebuilt.keys() == expected.keys()
    for param_name, grad in rebuilt.items():
        torch.testing.assert_close(grad, expected[param_name], rtol=1e-9, atol=1e-12, msg=param_name)


def test_rebuilt_float32_gradients_stay_close():
    model = perturbed_model("ddl-cc").train()
    input_ids = tokens(seq_len=16)
    rebuilt = gradients(model, model(input_ids, labels=input_ids).loss)
    model.gradient_checkpointing_enable()  # no tape: checkpointed layers recompute their states instead
    kept, loss = layer_outputs_alive_after_forward(model, input_ids)
    expected = gradients(model, loss)
    for param_name, grad in rebuilt.items():
        scale = max(expected[param_name].abs().max().item(), 1.0)
        torch.testing.assert_close(grad, expected[param_name], rtol=1e-4, atol=1e-6 * scale, msg=param_name)


def test_a_second_backward_rebuilds_the_states_again():
    model = perturbed_model("ddl-cc", num_hidden_layers=2).double().train()
    input_ids = tokens()
    loss = model(input_ids, labels=input_ids).loss
    first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_states_returned_as_hidden_states_are_used_as_they_are(reference_operators):
    model = perturbed_model("ddl-tc", num_hidden_layers=2).double().train()
    input_ids = tokens()

    def loss_of_hidden_states():
        out = model(input_ids, output_hidden_states=True)
        return sum(hidden.square().mean() for hidden in out.hidden_states) + out.logits.logsumexp(-1).mean()

    expected = gradients(model, loss_of_hidden_states())
    delta_ops.set_implementation("fused")
    got = gradients(model, loss_of_hidden_states())
    for param_name, grad in got.items():
        torch.testing.assert_close(grad, expected[param_name], rtol=1e-9, atol=1e-12, msg=param_name)


def test_bfloat16_states_are_kept():
    model = perturbed_model("ddl-cc", num_hidden_layers=2).to(torch.bfloat16).train()
    kept, loss = layer_outputs_alive_after_forward(model, tokens())
    assert all(kept)
    loss.backward()


def test_only_eager_fused_training_records():
    model = perturbed_model("ddl-cc", num_hidden_layers=2).train()
    state = torch.zeros(1, requires_grad=True)
    assert not isinstance(model.model._state_recording(state), nullcontext)
    with torch.no_grad():
        assert isinstance(model.model._state_recording(state), nullcontext)
    model.gradient_checkpointing_enable()
    assert isinstance(model.model._state_recording(state), nullcontext)
    model.gradient_checkpointing_disable()
    delta_ops.set_implementation("reference")
    try:
        assert isinstance(model.model._state_recording(state), nullcontext)
    finally:
        delta_ops.set_implementation("fused")
    assert isinstance(perturbed_model("baseline").train().model._state_recording(state), nullcontext)


def test_tape_rebuilds_views_and_undoes_rewrites_in_order():
    generator = torch.Generator().manual_seed(0)
    batch, hidden, channels = (2, 3), 8, 4
    start = torch.randn(*batch, hidden, channels, generator=generator, dtype=torch.float64).requires_grad_()
    directions = [
        torch.randn(*batch, hidden, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(3)
    ]
    targets = [torch.randn(*batch, channels, generator=generator, dtype=torch.float64) for _ in range(3)]
    betas = [2 * torch.rand(*batch, 1, generator=generator, dtype=torch.float64) for _ in range(3)]
    read = torch.randn(channels, dtype=torch.float64)

    def run(record: bool):
        state = start * 1.0  # a state made inside the recording
        context = state_tape.record_states(state) if record else torch.enable_grad()
        with context as tape:
            loss = 0.0
            for direction, target, beta in zip(directions, targets, betas):
                loss = loss + (state.transpose(-1, -2) @ direction.unsqueeze(-1)).square().sum()  # saves a view
                state = fused_delta_update(state, direction, target, beta)
            loss = loss + (state @ read).sum()
        return loss, tape

    expected = torch.autograd.grad(run(False)[0], [start, *directions])
    loss, tape = run(True)
    assert len(tape.states) == 4 and len(tape.rewrites) == 3
    assert [ref() is None for ref in tape.states] == [True, True, True, False]
    got = torch.autograd.grad(loss, [start, *directions])
    assert tape.buffer_index == 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seq_len", [1, 5])
def test_fused_embedding_expansion_matches_reference(dtype, seq_len):
    generator = torch.Generator().manual_seed(0)
    hidden, channels, kernel = 6, 3, 4
    window = torch.randn(2, kernel - 1 + seq_len, hidden, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(hidden * channels, 1, kernel, generator=generator).to(dtype).requires_grad_()
    expected = expand_embeddings(window, weight)
    got = fused_expand_embeddings(window, weight)
    assert got.shape == expected.shape == (2, seq_len, hidden, channels)
    assert got.transpose(-1, -2).is_contiguous(), "the expanded state is channel-major"
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    grad_out = torch.randn(expected.shape, generator=generator).to(dtype)
    got_grads = torch.autograd.grad(got, [window, weight], grad_out)
    for a, b in zip(got_grads, torch.autograd.grad(expected, [window, weight], grad_out)):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)
    with torch.no_grad():
        torch.testing.assert_close(fused_expand_embeddings(window, weight), expected.detach(), rtol=tol, atol=tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(fused_expand_embeddings, (window, weight))


def test_in_place_changes_before_backward_are_still_caught():
    model = perturbed_model("ddl-scalar", num_hidden_layers=2).train()
    input_ids = tokens()
    loss = model(input_ids, labels=input_ids).loss
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_double_backward_needs_the_reference_operators(reference_operators):
    model = perturbed_model("ddl-cc", num_hidden_layers=2, attn_implementation="eager").double().train()
    input_ids = tokens()

    def gradient_penalty():
        embeds = model.model.embed_tokens(input_ids)
        loss = model(inputs_embeds=embeds, labels=input_ids).loss
        (grad_embeds,) = torch.autograd.grad(loss, embeds, create_graph=True)
        return grad_embeds.square().sum()

    assert all(torch.isfinite(g).all() for g in gradients(model, gradient_penalty()).values())
    delta_ops.set_implementation("fused")
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gradient_penalty().backward()


def test_only_views_inside_a_state_become_tokens():
    base = torch.randn(4, 6, dtype=torch.float64)
    state = base[:2]  # the same data pointer as `base`
    tape = state_tape.StateTape()
    tape.add_state(state)
    assert isinstance(tape.pack(state.t()), state_tape._StateToken)
    assert isinstance(tape.pack(base), state_tape._Saved)  # starts at the state but reaches past it
    assert isinstance(tape.pack(torch.empty(0, dtype=torch.float64)), state_tape._Saved)
    torch.testing.assert_close(tape.unpack(tape.pack(state.t())), state.t())


def test_autocast_keeps_float32_states_and_rebuilds_them():
    # mixed precision (Trainer's bf16): float32 weights and states, bfloat16 sublayer outputs
    model = perturbed_model("ddl-cc", num_hidden_layers=3).train()
    input_ids = tokens(seq_len=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with patch.object(DDLModel, "_state_recording", lambda self, state: nullcontext()):
            kept, loss = layer_outputs_alive_after_forward(model, input_ids)
        expected = gradients(model, loss)
        rebuilt, loss = layer_outputs_alive_after_forward(model, input_ids)
    assert kept[:-1] == [True, True] and rebuilt[:-1] == [False, False]
    for param_name, grad in gradients(model, loss).items():
        scale = max(expected[param_name].abs().max().item(), 1.0)
        torch.testing.assert_close(grad, expected[param_name], rtol=1e-3, atol=1e-5 * scale, msg=param_name)
