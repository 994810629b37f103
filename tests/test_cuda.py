"""The fused operators, the state tape and cached decoding on CUDA (skipped where no GPU is present).

Every CUDA result is compared with the reference operators in float64 on the CPU, by the relative error of the whole
tensor: float32 (TF32 convolutions included) well under 1e-3, bfloat16 under 2e-2.
"""

from contextlib import nullcontext
from unittest.mock import patch

import pytest
import torch
from conftest import ALL_PRESETS, TEST_VOCAB, logits_and_grads, perturbed_model, relative_error

from ddl_transformers import DDLModel, delta_ops
from ddl_transformers.delta_ops import (
    channel_mix,
    delta_update,
    expand_embeddings,
    fused_channel_mix,
    fused_delta_update,
    fused_expand_embeddings,
    fused_token_mix,
    fused_write_only_update,
    token_mix,
    write_only_update,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

D, DV, K = 64, 4, 4
MAX_ERROR = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def cuda_against_float64(fused, reference, inputs: list[torch.Tensor], dtype: torch.dtype, keep_float32=()) -> None:
    """`fused` on CUDA in `dtype` against `reference` in float64 on the CPU: values and every input's gradient."""
    wide = [t.double().requires_grad_() for t in inputs]
    on_gpu = [
        t.to("cuda", torch.float32 if i in keep_float32 else dtype).requires_grad_() for i, t in enumerate(inputs)
    ]
    expected = reference(*wide)
    got = fused(*on_gpu)
    assert got.device.type == "cuda" and got.dtype == on_gpu[0].dtype and got.shape == expected.shape
    grad_out = torch.randn(expected.shape, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, wide, grad_out)
    grads = torch.autograd.grad(got, on_gpu, grad_out.to("cuda", got.dtype))
    assert relative_error(got, expected) < MAX_ERROR[dtype]
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) < MAX_ERROR[dtype] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value_channels", [1, DV])
@pytest.mark.parametrize("erase", [True, False])
def test_cuda_rewrite(dtype, value_channels, erase):
    torch.manual_seed(0)
    state_shape = (3, 33, D) if value_channels == 1 else (3, 33, D, value_channels)
    inputs = [torch.randn(state_shape), torch.randn(3, 33, D), torch.randn(3, 33, value_channels)]
    inputs.append(2 * torch.rand(3, 33, 1))
    fused, reference = (fused_delta_update, delta_update) if erase else (fused_write_only_update, write_only_update)
    cuda_against_float64(fused, reference, inputs, dtype, keep_float32=(3,))  # the model's gate is float32
    with torch.no_grad():  # the decoding path
        got = fused(*[t.to("cuda", torch.float32 if i == 3 else dtype) for i, t in enumerate(inputs)])
        assert relative_error(got, reference(*[t.double() for t in inputs])) < MAX_ERROR[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compressors_and_expansion(dtype):
    torch.manual_seed(0)
    states, history = torch.randn(2, 9, D, DV), torch.randn(2, K - 1, D, DV)
    conv_weight, read = torch.randn(D * DV, 1, K), torch.randn(DV)
    cuda_against_float64(fused_channel_mix, channel_mix, [states, torch.randn(D, DV)], dtype, keep_float32=(1,))
    cuda_against_float64(fused_token_mix, token_mix, [states, conv_weight, read], dtype, keep_float32=(1, 2))
    for length in (1, 9):  # one decoded token, and a prompt
        cuda_against_float64(
            fused_token_mix, token_mix, [states[:, :length], conv_weight, read, history], dtype, keep_float32=(1, 2)
        )
    window = torch.randn(2, K - 1 + 9, D)
    cuda_against_float64(fused_expand_embeddings, expand_embeddings, [window, torch.randn(D * DV, 1, K)], dtype)


@pytest.mark.parametrize("name", ALL_PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_matches_the_float64_reference(name, dtype, reference_operators):
    model = perturbed_model(name).double().train()
    tokens = torch.randint(3, TEST_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    expected_logits, expected_grads = logits_and_grads(model, tokens)
    delta_ops.set_implementation("fused")
    model = model.to("cuda", dtype)
    logits, grads = logits_and_grads(model, tokens.cuda())
    assert relative_error(logits, expected_logits) < MAX_ERROR[dtype]
    if dtype == torch.float32:  # TF32 convolutions (cuDNN's default) add a little
        for grad, expected_grad in zip(grads.values(), expected_grads.values()):
            assert relative_error(grad, expected_grad) < MAX_ERROR[dtype] * 3
    else:  # one bfloat16 gradient of a tiny parameter can be far off; all of them together stay close
        flat = torch.cat([grad.double().flatten().cpu() for grad in grads.values()])
        assert (
            relative_error(flat, torch.cat([grad.flatten() for grad in expected_grads.values()]))
            < MAX_ERROR[dtype] * 2
        )


def peak_training_memory(model, tokens, recording: bool) -> tuple[int, dict[str, torch.Tensor]]:
    context = nullcontext() if recording else patch.object(DDLModel, "_state_recording", lambda s, x: nullcontext())
    model.zero_grad(set_to_none=True)  # else the second run starts with the first one's gradients, freed inside it
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with context:
        _, grads = logits_and_grads(model, tokens)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, grads


@pytest.mark.parametrize("name", ["ddl-scalar", "ddl-cc", "ddl-tc"])
def test_cuda_state_tape_saves_memory_and_keeps_gradients(name):
    model = perturbed_model(name, num_hidden_layers=6).cuda().train()
    tokens = torch.randint(3, TEST_VOCAB, (8, 256), generator=torch.Generator().manual_seed(0)).cuda()
    kept_peak, kept_grads = peak_training_memory(model, tokens, recording=False)
    rebuilt_peak, rebuilt_grads = peak_training_memory(model, tokens, recording=True)
    state_bytes = tokens.numel() * model.config.hidden_size * model.config.value_channels * 4
    # the tape keeps the last state and one rebuild buffer instead of about two states per layer
    assert kept_peak - rebuilt_peak > model.config.num_hidden_layers * state_bytes / 2, (rebuilt_peak, kept_peak)
    for grad, expected in zip(rebuilt_grads.values(), kept_grads.values()):
        assert relative_error(grad, expected.double().cpu()) < 1e-4


@pytest.mark.parametrize("name", ["ddl-scalar", "ddl-cc", "ddl-tc"])
def test_cuda_cached_decoding_matches_the_full_forward(name):
    model = perturbed_model(name).cuda()
    prompt = torch.randint(3, TEST_VOCAB, (2, 7), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        full = model(generated).logits[:, prompt.shape[1] - 1 : -1]
        steps = model(prompt, use_cache=True)
        step_logits = [steps.logits[:, -1]]
        for position in range(prompt.shape[1], generated.shape[1] - 1):
            steps = model(generated[:, position : position + 1], cache=steps.cache, use_cache=True)
            step_logits.append(steps.logits[:, -1])
    assert relative_error(torch.stack(step_logits, 1), full.double().cpu()) < 1e-4
    assert torch.equal(full.argmax(-1), generated[:, prompt.shape[1] :])


@pytest.mark.parametrize("name", ["ddl-scalar", "ddl-cc", "ddl-tc", "write-only"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_model_under_autocast(name, dtype):
    # Trainer's bf16/fp16: float32 weights and states on the GPU, backward inside and outside the autocast region
    model = perturbed_model(name).cuda().train()
    tokens = torch.randint(3, TEST_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    expected_logits, expected_grads = logits_and_grads(model, tokens)
    for backward_inside in (True, False):
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            out = model(tokens, labels=tokens)
            if backward_inside:
                out.loss.backward()
        if not backward_inside:
            out.loss.backward()
        assert relative_error(out.logits, expected_logits.double().cpu()) < 5e-2
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        expected = torch.cat([grad.flatten() for grad in expected_grads.values()])
        assert relative_error(grads, expected.double().cpu()) < 5e-2
