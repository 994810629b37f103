"""Behaviour required of every preset, on the tiny size with weights moved off their initial values."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_PRESETS, TEST_VOCAB, perturbed_model, tiny_config
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, CompileConfig, DynamicCache, StaticCache

from ddl_transformers import DDLForCausalLM, DDLModel
from ddl_transformers.modeling_ddl import DDLDeltaResidual

PAD = 0


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TEST_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_backward(preset_name, dtype):
    model = perturbed_model(preset_name).to(dtype).train()
    tokens = random_tokens(2, 16)
    out = model(tokens, labels=tokens)
    assert out.logits.shape == (2, 16, TEST_VOCAB) and out.logits.dtype == dtype
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # every DDL parameter receives gradient
    ddl_grads = [p.grad.abs().sum() for n, p in model.named_parameters() if "residual" in n or "compressor" in n]
    assert all(g > 0 for g in ddl_grads)


def test_loss_shifts_labels_and_ignores_minus_100():
    model = perturbed_model("ddl-cc")
    tokens = random_tokens(2, 12)
    labels = tokens.clone()
    labels[0, :5] = -100
    out = model(tokens, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, TEST_VOCAB)
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_gradient_accumulation_is_exact_with_num_items_in_batch():
    tokens = random_tokens(4, 12)
    labels = tokens.clone()
    labels[0, 3:] = -100  # micro-batches with very different numbers of target tokens
    full = perturbed_model("ddl-cc").train()
    full(tokens, labels=labels).loss.backward()

    accumulated = perturbed_model("ddl-cc").train()
    num_items = (labels[:, 1:] != -100).sum()
    for part in (slice(0, 1), slice(1, 4)):
        accumulated(tokens[part], labels=labels[part], num_items_in_batch=num_items).loss.backward()
    for (name, p_full), p_acc in zip(full.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(p_acc.grad, p_full.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cached_logits_equal_full_forward(preset_name):
    model = perturbed_model(preset_name)
    tokens = random_tokens(2, 13)
    full = model(tokens).logits
    cache = DynamicCache(config=model.config)
    pieces = []
    for start, end in [(0, 5), (5, 7), (7, 8), (8, 9), (9, 13)]:  # chunked prefill, then single-token steps
        pieces.append(model(tokens[:, start:end], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ddl-tc", "ddl-cc", "ddl-tc-noec"])
def test_a_cache_recording_its_past_gives_the_same_logits(name):
    # assisted generation makes the cache keep every convolution input until it crops back: the convolutions must read
    # the last inputs of the longer conv states, not the first
    model = perturbed_model(name)
    tokens = random_tokens(2, 9)
    full = model(tokens).logits
    cache = DynamicCache(config=model.config)
    pieces = [model(tokens[:, :4], cache=cache, use_cache=True).logits]
    cache.activate_past_recording()
    for start, end in [(4, 5), (5, 6), (6, 8), (8, 9)]:
        pieces.append(model(tokens[:, start:end], cache=cache, use_cache=True).logits)
    conv_lengths = {
        state.shape[-1] for layer in cache.layers for state in layer.conv_states.values() if state is not None
    }
    assert max(conv_lengths) > model.config.state_conv_kernel_size  # the cache did grow
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_generate_with_cache_equals_without(preset_name):
    model = perturbed_model(preset_name)
    prompt = random_tokens(2, 6)
    with_cache = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=PAD)
    without_cache = model.generate(
        prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=PAD, use_cache=False
    )
    assert torch.equal(with_cache, without_cache)


def test_left_padding_gives_the_same_tokens_and_logits(preset_name):
    model = perturbed_model(preset_name)
    short, long = random_tokens(1, 5, seed=2), random_tokens(1, 9, seed=3)
    # pad with a real (non-zero) embedding: a zero pad embedding would hide leaks
    batch = torch.cat([torch.cat([torch.full((1, 4), 7), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    generated = model.generate(
        batch, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=PAD
    )
    alone_short = model.generate(short, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=PAD)
    alone_long = model.generate(long, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=PAD)
    assert torch.equal(generated[0, 4:], alone_short[0])
    assert torch.equal(generated[1], alone_long[0])

    padded_logits = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(padded_logits[0, 4:], model(short).logits[0], rtol=1e-4, atol=1e-4)
    other_pad = batch.clone()
    other_pad[0, :4] = torch.tensor([50, 60, 70, 80])
    torch.testing.assert_close(
        model(other_pad, attention_mask=mask).logits[0, 4:], padded_logits[0, 4:], rtol=1e-5, atol=1e-5
    )


def greedy_with_logits(model: DDLForCausalLM, tokens: torch.Tensor, new_tokens: int, **kwargs):
    """`generate` of exactly `new_tokens` greedy tokens, returning the sequences and every step's logits."""
    return model.generate(
        tokens,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


def assert_same_generation(got, expected, message=None) -> None:
    assert torch.equal(got.sequences, expected.sequences), message
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)


def test_static_cache_generates_like_the_dynamic_cache(preset_name):
    # with a static cache `generate` builds the masks once per step and passes them as a dict; with one-token prefill
    # chunks, the padded prompt tokens come one at a time and must still be masked
    model = perturbed_model(preset_name)
    batch = torch.cat([torch.cat([torch.full((1, 3), 7), random_tokens(1, 4, seed=2)], dim=1), random_tokens(1, 7)])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    dynamic = greedy_with_logits(model, batch, 6, attention_mask=mask)
    for chunking in ({}, {"prefill_chunk_size": 1}):
        static = greedy_with_logits(model, batch, 6, attention_mask=mask, cache_implementation="static", **chunking)
        assert isinstance(static.cache, StaticCache)
        assert_same_generation(static, dynamic, chunking)


def test_compiled_generation_with_a_static_cache(preset_name):
    # what `generate` does on a GPU with a static cache: each decoding step one graph (no break), the same tokens
    torch._dynamo.reset()
    counters.clear()
    model = perturbed_model(preset_name)
    prompt = random_tokens(2, 6)
    eager = greedy_with_logits(model, prompt, 5)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True  # `generate` compiles only on accelerators unless told
    compiled = greedy_with_logits(model, prompt, 5, cache_implementation="static", compile_config=compile_config)
    assert counters["stats"]["unique_graphs"] >= 1
    assert_same_generation(compiled, eager)


def test_gradient_checkpointing_gives_the_same_gradients(preset_name):
    tokens = random_tokens(2, 10)
    grads = []
    for checkpointing in (False, True):
        model = perturbed_model(preset_name).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_eager_and_sdpa_agree(preset_name):
    tokens = random_tokens(2, 10)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = perturbed_model(preset_name)
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        logits[implementation] = model(tokens, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("zeroed", ["self_attn.o_proj", "mlp.down_proj"])
def test_zero_sublayer_output_is_finite(preset_name, zeroed):
    model = perturbed_model(preset_name).train()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.get_submodule(zeroed).weight.zero_()
    tokens = random_tokens(2, 8)
    out = model(tokens, labels=tokens)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_hidden_states_are_per_layer_states(preset_name):
    model = perturbed_model(preset_name)
    tokens = random_tokens(2, 7)
    out = model(tokens, output_hidden_states=True)
    config = model.config
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    state_shape = (2, 7, config.hidden_size) + ((config.value_channels,) if config.value_channels > 1 else ())
    assert all(h.shape == state_shape for h in out.hidden_states[:-1])
    # the last entry is the final normalised readout, the LM head's input
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


def test_fresh_delta_model_starts_at_the_configured_gate():
    for beta_init in (0.0, 0.5, 1.0, 2.0):
        model = DDLForCausalLM(tiny_config("ddl-cc", beta_init=beta_init))
        residual = model.model.layers[0].attn_residual
        beta = residual.gate(torch.zeros(3, model.config.hidden_size))
        torch.testing.assert_close(beta, torch.full((3, 1), beta_init), atol=2e-4, rtol=0)


def test_two_layer_gate_and_linear_target():
    model = perturbed_model("ddl-cc", beta_hidden_size=8, value_activation="linear")
    residual = model.model.layers[0].mlp_residual
    assert residual.beta_hidden.weight.shape == (8, model.config.hidden_size)
    assert residual.value_proj.bias is None
    tokens = random_tokens(1, 6)
    assert torch.isfinite(model(tokens).logits).all()
    context = torch.randn(4, model.config.hidden_size)
    beta = residual.gate(context)
    assert ((beta > 0) & (beta < 2)).all() and beta.dtype == torch.float32


@pytest.mark.parametrize("value_activation", ["sigmoid", "linear"])
def test_one_projection_gives_the_target_and_gate_and_follows_parameter_changes(value_activation):
    residual = perturbed_model("ddl-cc", value_activation=value_activation).model.layers[0].attn_residual
    context = torch.randn(2, 3, residual.value_proj.in_features)

    def separate():
        return residual.target(context).float(), residual.gate(context)

    for grad_enabled in (True, False):
        with torch.set_grad_enabled(grad_enabled):
            for got, expected in zip(residual.target_and_gate(context), separate()):
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        before = residual.target_and_gate(context)
        with torch.no_grad():  # changed in place, and through `.data` (which leaves the version counter alone)
            residual.beta_proj.bias.add_(1.0)
            residual.value_proj.weight.data.mul_(0.5)
        after = residual.target_and_gate(context)
        for got, expected in zip(after, separate()):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(after[1], before[1]) and not torch.allclose(after[0], before[0])


def test_the_target_and_gate_stay_float32_under_autocast():
    residual = perturbed_model("ddl-cc").model.layers[0].attn_residual
    context = torch.randn(2, 3, residual.value_proj.in_features)
    expected = residual.target(context), residual.gate(context)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, beta = residual.target_and_gate(context)
    assert value.dtype == torch.float32 and value.is_contiguous()
    torch.testing.assert_close(value, expected[0], rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(beta.float(), expected[1], rtol=3e-2, atol=3e-2)


def test_a_hooked_or_wrapped_value_projection_is_called():
    residual = perturbed_model("ddl-cc").model.layers[0].mlp_residual
    context = torch.randn(2, 3, residual.value_proj.in_features)
    value, beta = residual.target_and_gate(context)
    hook = residual.value_proj.register_forward_hook(lambda module, args, output: output + 1.0)
    try:
        hooked_value, hooked_beta = residual.target_and_gate(context)
        expected = residual.value_scale * torch.sigmoid(residual.value_proj(context))  # the hook shifts the logits
    finally:
        hook.remove()
    torch.testing.assert_close(hooked_value, expected)
    assert not torch.allclose(hooked_value, value)
    torch.testing.assert_close(hooked_beta, beta)


def test_float64_models_keep_float64_targets():
    residual = perturbed_model("write-only").double().model.layers[0].attn_residual
    context = torch.randn(2, 3, residual.value_proj.in_features, dtype=torch.float64)
    value, beta = residual.target_and_gate(context)
    assert value.dtype == beta.dtype == torch.float64
    torch.testing.assert_close(value, residual.target(context), rtol=1e-12, atol=1e-12)


def test_a_model_built_in_inference_mode_runs():
    expected = perturbed_model("ddl-cc")(random_tokens(1, 5)).logits
    with torch.inference_mode():
        model = perturbed_model("ddl-cc")
        torch.testing.assert_close(model(random_tokens(1, 5)).logits, expected)


def test_residual_modes_differ_only_in_the_update():
    context, h = torch.randn(2, 5, 128), torch.randn(2, 5, 128)
    state = torch.randn(2, 5, 128, 4)
    torch.manual_seed(0)
    delta = DDLDeltaResidual(tiny_config("ddl-cc"))
    torch.manual_seed(0)
    write_only = DDLDeltaResidual(tiny_config("write-only"))
    additive = DDLDeltaResidual(tiny_config("baseline", value_channels=4))
    torch.testing.assert_close(additive(state, h, context), state + h.unsqueeze(-1))
    k = h / h.norm(dim=-1, keepdim=True)
    read = torch.einsum("btd,btdv->btv", k, state)
    erase = delta(state, h, context) - write_only(state, h, context)
    expected_erase = -delta.gate(context).unsqueeze(-1) * k.unsqueeze(-1) * read.unsqueeze(-2)
    torch.testing.assert_close(erase, expected_erase, rtol=1e-4, atol=1e-4)


def test_auto_classes_are_registered():
    settings = {k: v for k, v in tiny_config("ddl-scalar").to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("ddl", **settings)
    assert isinstance(AutoModelForCausalLM.from_config(config), DDLForCausalLM)
    assert isinstance(AutoModel.from_config(config), DDLModel)


def test_module_names_follow_llama():
    names = dict(perturbed_model("ddl-cc").named_parameters())
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "model.layers.0.attn_residual.beta_proj.bias",
        "model.layers.0.mlp_residual.value_proj.weight",
    ]:
        assert name in names, name


def test_wrong_cache_type_is_a_clear_error():
    model = perturbed_model("ddl-tc")
    with pytest.raises(ValueError, match="DynamicCache\\(config=model.config\\)"):
        model(random_tokens(1, 4), cache=DynamicCache(), use_cache=True)


@pytest.mark.parametrize("name", ["ddl-tc", "ddl-cc"])
def test_beam_search_runs_with_conv_states(name):
    model = perturbed_model(name)
    out = model.generate(random_tokens(2, 5), max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=PAD)
    assert out.shape == (2, 9)


def test_presets_cover_every_variant():
    assert set(ALL_PRESETS) == {
        "baseline",
        "ddl-scalar",
        "ddl-cc",
        "ddl-cc-noec",
        "ddl-tc",
        "ddl-tc-noec",
        "write-only",
    }
