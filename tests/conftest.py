import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels (tests/test_triton.py) then run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is first imported

from ddl_transformers import PRESETS, DDLForCausalLM, delta_ops, preset_config  # noqa: E402

ALL_PRESETS = list(PRESETS)
TEST_VOCAB = 96


def tiny_config(name: str, **overrides):
    """The `tiny` size with a small vocabulary and a pad token, for fast CPU tests."""
    defaults = {"vocab_size": TEST_VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return preset_config(name, "tiny", **{**defaults, **overrides})


def perturbed_model(name: str, seed: int = 0, scale: float = 0.2, **overrides) -> DDLForCausalLM:
    """A tiny model whose every parameter is moved off its initial value (identity convolutions, the zero pad
    embedding and unit norms would otherwise hide cache and padding bugs)."""
    torch.manual_seed(seed)
    model = DDLForCausalLM(tiny_config(name, **overrides))
    with torch.no_grad():
        for param in model.parameters():
            spread = max(param.std().item() if param.numel() > 1 else 1.0, 0.1)
            param.add_(scale * spread * torch.randn_like(param))
    return model.eval()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """`||got - expected|| / ||expected||` over the whole tensor (got may be on a GPU, in any dtype); got must be finite."""
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def logits_and_grads(model: DDLForCausalLM, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits and every parameter's gradient (by name) of one training step on `tokens`."""
    model.zero_grad()
    out = model(tokens, labels=tokens)
    out.loss.backward()
    return out.logits.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """The native implementation's C kernels are built into a folder of this session, not the user's cache; the
    optional C++ extension stays off (its own tests in test_cpu_kernels.py turn it on), so that every other test runs
    the default ctypes calls even after those tests have built it."""
    settings = {
        "DDL_TRANSFORMERS_CACHE": str(tmp_path_factory.mktemp("ddl_kernels")),
        "DDL_TRANSFORMERS_CPU_EXTENSION": "0",
    }
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield
    for name, value in previous.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def default_operators_afterwards():
    """Every test starts with the default operators, whatever the one before it chose."""
    yield
    delta_ops.set_implementation(delta_ops.DEFAULT_IMPLEMENTATION)


@pytest.fixture
def reference_operators():
    """The reference operators for the test (the default ones afterwards)."""
    delta_ops.set_implementation("reference")


@pytest.fixture(params=ALL_PRESETS)
def preset_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest on one thread, and far faster than two on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def isolated_datasets_cache(tmp_path_factory):
    """Keep the HF datasets cache of a test module in a temporary folder."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield
