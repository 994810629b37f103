"""Saved folders load with `trust_remote_code=True` where `ddl_transformers` cannot be imported."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import perturbed_model
from safetensors.torch import load_file

from ddl_transformers import delta_ops

TOKENS = [[5, 9, 11, 30, 42, 7, 3, 64]]
STANDARD_LIBRARY = sys.stdlib_module_names

LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys
    sys.modules["ddl_transformers"] = None  # any `import ddl_transformers` now fails
    import torch
    from transformers import AutoModelForCausalLM
    folder, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]))  # the test's: other counts may round the matrix products otherwise
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "ddl_transformers" not in type(model).__module__, type(model).__module__
    with torch.no_grad():
        logits = model(torch.tensor({tokens})).logits
        generated = model.generate(torch.tensor({tokens}), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    torch.save({{"logits": logits, "generated": generated, "module": type(model).__module__}}, out)
    """
).format(tokens=TOKENS)


@pytest.mark.parametrize("name", ["ddl-cc", "ddl-tc"])
def test_saved_folder_loads_as_remote_code_with_identical_logits(tmp_path, name):
    model = perturbed_model(name)
    folder = tmp_path / "model"
    model.save_pretrained(folder)

    files = {p.name for p in folder.iterdir()}
    assert {"configuration_ddl.py", "modeling_ddl.py", "delta_ops.py", "state_tape.py", "model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert not {"triton_rewrite.py", "cpu_kernels.py", "cpu_kernels.c", "cpu_extension.cpp"} & files, (
        "optional kernels are not remote code"
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ddl.DDLConfig",
        "AutoModel": "modeling_ddl.DDLModel",
        "AutoModelForCausalLM": "modeling_ddl.DDLForCausalLM",
    }
    for code_file in folder.glob("*.py"):
        imports = [line for line in code_file.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert all(
            line.split()[1].split(".")[0] in {"torch", "transformers", "", *STANDARD_LIBRARY} for line in imports
        ), imports
    assert "model.embed_tokens.weight" in load_file(folder / "model.safetensors")

    result_file = tmp_path / "result.pt"
    subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(folder), str(result_file), str(torch.get_num_threads())],
        check=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"},
    )
    result = torch.load(result_file)
    assert result["module"].startswith("transformers_modules")
    delta_ops.set_implementation("fused")  # the remote code's operators (it does not carry the C kernels)
    with torch.no_grad():
        expected = model(torch.tensor(TOKENS)).logits
        generated = model.generate(torch.tensor(TOKENS), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=0)
    assert torch.equal(result["generated"], generated)


def test_reload_with_the_package_keeps_weights(tmp_path):
    from ddl_transformers import DDLForCausalLM

    model = perturbed_model("write-only")
    model.save_pretrained(tmp_path)
    reloaded = DDLForCausalLM.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
