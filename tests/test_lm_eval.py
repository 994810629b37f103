"""The exported `ptb_ddl` lm-evaluation-harness task, and the real `lm_eval` CLI run offline against a saved DDL model.

lm-eval's `loglikelihood_rolling` windows equal ours with `per_document=True` (see `evaluation.document_nlls`), and the
task's `process_results` counts words and bytes as `data.count_words`/`data.count_bytes`, so both tools must report
the same word perplexity up to float32 rounding. Tolerance: the per-document and total NLL agree to a relative 1e-5
(measured: about 1e-7, from different float32 reduction orders: lm-eval takes a full log-softmax of every window
position, we keep only the scored logits); word perplexity is `exp(nll / words)`, so its relative error is that of
the NLL times `ln(word_perplexity)` (about 20 for this untrained model), hence 1e-4 for the perplexities.
"""

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import perturbed_model

from ddl_transformers import data
from ddl_transformers.evaluation import document_nlls, evaluate_perplexity
from ddl_transformers.lm_eval_export import export_lm_eval_task, load_task_template

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "export_lm_eval_task.py"
TEMPLATE_DIR = ROOT / "ddl_transformers" / "lm_eval_tasks"
MAX_POSITIONS = 64
MAX_LENGTH = 48  # below the model's context, so a window length lm-eval ignored would show
NUM_DOCUMENTS = 30
NLL_RTOL = 1e-5
PPL_RTOL = 1e-4

# Any IPv4/IPv6 connection or name lookup in the lm_eval process is recorded and refused.
NETWORK_GUARD = textwrap.dedent(
    """
    import os
    import socket
    import sys

    _LOG = os.environ["DDL_NETWORK_LOG"]


    def _guard(event, args):
        if event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6):
            target = args[1]
        elif event == "socket.getaddrinfo":
            target = args[:2]
        else:
            return
        with open(_LOG, "a") as handle:
            handle.write(f"{event} {target!r}\\n")
        raise OSError(f"network access blocked in this test: {event} {target!r}")


    sys.addaudithook(_guard)
    """
)


pytestmark = pytest.mark.usefixtures("isolated_datasets_cache")


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus("ptb")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    return export_lm_eval_task(tmp_path_factory.mktemp("tasks"), "ptb", max_documents=NUM_DOCUMENTS)


def load_task_utils(folder: Path):
    spec = importlib.util.spec_from_file_location(f"task_utils_{abs(hash(folder))}", folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_export_writes_data_yaml_and_utils(task_folder, corpus):
    assert task_folder.name == "ptb_ddl"
    assert {p.name for p in task_folder.iterdir()} == {
        "ptb_word_perplexity.yaml",
        "utils.py",
        "validation.jsonl",
        "test.jsonl",
    }
    for split in ("validation", "test"):
        expected = data.corpus_documents(corpus[split])[:NUM_DOCUMENTS]
        assert read_jsonl(task_folder / f"{split}.jsonl") == expected  # the exact strings, spaces included

    yaml_loader = pytest.importorskip("lm_eval.tasks._yaml_loader")
    config = yaml_loader.load_yaml(task_folder / "ptb_word_perplexity.yaml")
    assert config["task"] == "ptb_ddl"
    assert (config["dataset_path"], config["output_type"], config["doc_to_target"]) == (
        "json",
        "loglikelihood_rolling",
        "text",
    )
    files = config["dataset_kwargs"]["data_files"]
    assert files == {split: str(task_folder / f"{split}.jsonl") for split in ("validation", "test")}
    assert all(os.path.isabs(path) for path in files.values())  # independent of lm_eval's working directory
    assert (config["validation_split"], config["test_split"]) == ("validation", "test")
    assert [m["metric"] for m in config["metric_list"]] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    assert callable(config["process_results"])
    # everything but the task name and data files comes from the packaged template
    template = load_task_template()
    for key in ("dataset_path", "output_type", "doc_to_text", "doc_to_target", "metric_list", "metadata"):
        assert config[key] == template[key], key


def test_task_counts_words_and_bytes_as_we_do(task_folder):
    documents = read_jsonl(task_folder / "test.jsonl") + ["Ünïcode déjà vu — naïve café", "a\tb  c\n"]
    utils = load_task_utils(task_folder)
    weights = [utils.process_results({"text": doc}, [-1.5]) for doc in documents]
    assert sum(w["word_perplexity"][1] for w in weights) == data.count_words(documents)
    assert sum(w["byte_perplexity"][1] for w in weights) == data.count_bytes(documents)
    assert all(w["bits_per_byte"] == w["byte_perplexity"] and w["word_perplexity"][0] == -1.5 for w in weights)
    # lm-eval's default (`len(re.split(r"\s+", doc))`) would count 2 extra words per PTB line: " no it was ... "
    task = pytest.importorskip("lm_eval.api.task")
    ptb = read_jsonl(task_folder / "test.jsonl")
    default = sum(task.ConfigurableTask.count_words(doc) for doc in ptb)
    assert default == data.count_words(ptb) + len(ptb)


def test_export_script_one_split(tmp_path, corpus):
    spec = importlib.util.spec_from_file_location("export_lm_eval_task_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    folder = module.main(["--output_dir", str(tmp_path), "--splits", "valid", "--max_documents", "3"])
    assert folder == tmp_path.resolve() / "ptb_ddl"
    assert {p.name for p in folder.glob("*.jsonl")} == {"validation.jsonl"}
    assert read_jsonl(folder / "validation.jsonl") == data.corpus_documents(corpus["validation"])[:3]
    text = (folder / "ptb_word_perplexity.yaml").read_text()
    assert "test_split" not in text and "validation_split: validation" in text


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"corpus": "wikitext"}, "Unknown corpus"),
        ({"splits": ("train",)}, "Unknown split"),
        ({"splits": ()}, "No split"),
        ({"max_documents": 0}, "max_documents"),
    ],
)
def test_export_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_lm_eval_task(tmp_path, **kwargs)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, corpus):
    """A perturbed (far from uniform) tiny DDL model with a 300-token BPE trained on a PTB slice, 64 positions."""
    tokenizer = data.train_tokenizer(corpus["train"].select(range(2000)), vocab_size=300)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    model = perturbed_model(
        "ddl-cc",
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        **ids,
    )
    folder = tmp_path_factory.mktemp("saved_model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.mark.slow
def test_lm_eval_cli_word_perplexity_matches_ours(saved_model, task_folder, tmp_path, single_thread):
    folder, model, tokenizer = saved_model
    documents = read_jsonl(task_folder / "test.jsonl")
    lengths = [len(ids) for ids in tokenizer(documents)["input_ids"]]
    assert max(lengths) > 2 * MAX_LENGTH  # rolling windows are exercised, up to three per document

    guard_dir = tmp_path / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(NETWORK_GUARD)
    network_log = tmp_path / "network.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # fresh caches: nothing is found that was not made here
        "PYTHONPATH": str(guard_dir),
        "DDL_NETWORK_LOG": str(network_log),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    output = tmp_path / "lm_eval_out"
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={folder},trust_remote_code=True,dtype=float32,max_length={MAX_LENGTH}",
        "--tasks",
        "ptb_ddl",
        "--include_path",
        str(task_folder),
        "--batch_size",
        "1",
        "--device",
        "cpu",
        "--output_path",
        str(output),
        "--log_samples",
    ]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert not network_log.exists(), network_log.read_text()

    (results_file,) = glob.glob(str(output / "*" / "results_*.json"))
    report = json.loads(Path(results_file).read_text())
    theirs = report["results"]["ptb_ddl"]
    assert report["n-samples"]["ptb_ddl"]["effective"] == NUM_DOCUMENTS
    (samples_file,) = glob.glob(str(output / "*" / "samples_ptb_ddl_*.jsonl"))
    samples = sorted(
        (json.loads(line) for line in Path(samples_file).read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    assert [s["doc"]["text"] for s in samples] == documents

    ours = evaluate_perplexity(model, tokenizer, documents, max_length=MAX_LENGTH, per_document=True, batch_size=4)
    assert ours["max_length"] == MAX_LENGTH and ours["stride"] == MAX_LENGTH
    # the same words and bytes per document ...
    assert sum(s["word_perplexity"][1] for s in samples) == ours["words"] == data.count_words(documents)
    assert sum(s["byte_perplexity"][1] for s in samples) == ours["bytes"]
    # ... and the same loglikelihood per document
    their_nlls = [-float(s["resps"][0][0]) for s in samples]
    our_nlls = [nll for nll, _ in document_nlls(model, tokenizer, documents, MAX_LENGTH, batch_size=4)]
    assert our_nlls == pytest.approx(their_nlls, rel=NLL_RTOL)
    assert ours["nll"] == pytest.approx(math.fsum(their_nlls), rel=NLL_RTOL)
    assert ours["bits_per_byte"] == pytest.approx(theirs["bits_per_byte,none"], rel=NLL_RTOL)
    assert ours["word_perplexity"] == pytest.approx(theirs["word_perplexity,none"], rel=PPL_RTOL)
    assert math.exp(ours["nll"] / ours["bytes"]) == pytest.approx(theirs["byte_perplexity,none"], rel=PPL_RTOL)
    print(
        f"lm_eval CLI {elapsed:.1f}s; word perplexity lm-eval {theirs['word_perplexity,none']:.6f} "
        f"ours {ours['word_perplexity']:.6f} (relative difference "
        f"{abs(ours['word_perplexity'] / theirs['word_perplexity,none'] - 1):.2e})"
    )
