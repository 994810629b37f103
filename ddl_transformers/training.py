"""Pretraining and fine-tuning DDL models with `Trainer` (and so with `accelerate launch` / `torchrun`).

`run_training(model_args, data_args, training_args)` is what `scripts/train.py` and `scripts/compare.py` call.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from .allocator import retain_freed_memory_on
from .configuration_ddl import DDLConfig
from .data import corpus_documents, load_corpus, load_or_train_tokenizer, pack_dataset
from .evaluation import evaluate_perplexity, save_results
from .modeling_ddl import DDLForCausalLM
from .plots import plot_loss_curve
from .presets import DEFAULT_PRESET, PRESETS, SIZES, preset_config

LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelArguments:
    """Which model to train: a preset from scratch, or an existing checkpoint to fine-tune."""

    preset: str | None = field(
        default=None, metadata={"help": f"Train from scratch: one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})."}
    )
    size: str = field(default="tiny", metadata={"help": f"Preset size: one of {', '.join(SIZES)}."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated DDLConfig overrides, e.g. 'value_channels=2,beta_init=0.5'."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Fine-tune this saved folder or Hub id (loaded with trust_remote_code)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Reuse this tokenizer; by default one is trained on the training split."}
    )
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size of a newly trained tokenizer."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    lora_r: int | None = field(default=None, metadata={"help": "Fine-tune with a LoRA adapter of this rank (peft)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default=",".join(LLAMA_TARGET_MODULES), metadata={"help": "Comma-separated module names for LoRA."}
    )


@dataclass
class DataArguments:
    """Which text to train on and how to cut it into blocks."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A built-in corpus (ptb, shakespeare) or a Hub dataset; default ptb."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local .txt/.jsonl/.parquet file or folder."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file or folder."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file or folder."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text in json/parquet files."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first rows of validation and test (for quick runs)."}
    )
    validation_split_percentage: int = field(default=5, metadata={"help": "Carved when a source has no split."})
    eval_blocks: int | None = field(
        default=None,
        metadata={
            "help": "Validation blocks used by the periodic evaluation during training (all by default); "
            "the final word-level evaluation always reads the whole validation and test text."
        },
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    sample_prompt: str = field(default="the company said", metadata={"help": "Prompt of the greedy sample."})
    sample_tokens: int = field(default=24, metadata={"help": "Tokens in the greedy sample (0 to skip)."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_file is None:
            self.dataset_name = "ptb"


def default_report_to() -> str:
    """Log to TensorBoard when it is installed, else nowhere."""
    return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"


@dataclass
class DDLTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults for small CPU runs (every field can still be set)."""

    output_dir: str = field(default="outputs/ddl-tiny-ptb", metadata={"help": "Where the Hub-ready folder goes."})
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: float = 30
    lr_scheduler_type: str = "cosine"
    max_steps: int = 300
    eval_strategy: str = "steps"
    eval_steps: float = 50
    logging_steps: float = 10
    save_strategy: str = "no"
    report_to: None | str | list[str] = field(default_factory=default_report_to)
    include_num_input_tokens_seen: str | bool = True
    dataloader_drop_last: bool = True
    seed: int = 0
    retain_freed_cpu_memory: bool = field(
        default=True,
        metadata={
            "help": "Training on the CPU, keep freed memory in the process for the next step "
            "(`ddl_transformers.allocator.retain_freed_memory`, glibc only): each step's tensors reuse the last "
            "step's pages instead of faulting fresh ones in (about 9% shorter steps here; peak memory 1-2.5% higher; "
            "for the rest of the process). False leaves malloc as it is."
        },
    )
    push_hub_ready_folder: bool = field(
        default=False,
        metadata={
            "help": "Set by --push_to_hub: at the end, the finished Hub-ready folder is pushed once, in one commit, "
            "by `ddl_transformers.hub.push_folder` (Trainer itself pushes nothing)."
        },
    )

    def __post_init__(self):
        # Without an accelerator, `torchrun`/`accelerate launch` runs are only distributed (gloo DDP) with use_cpu.
        if not self.use_cpu and not torch.cuda.is_available() and not torch.backends.mps.is_available():
            self.use_cpu = True
        if self.push_to_hub:
            # Trainer would create the repo at start-up and push every save (checkpoints, training_args.bin) and the
            # folder before its card exists; `run_training` pushes the complete folder once instead.
            self.push_to_hub, self.push_hub_ready_folder = False, True
        if self.push_hub_ready_folder and not self.hub_token:
            from huggingface_hub import get_token

            if not get_token():  # fail before hours of training, not after
                raise ValueError(
                    "--push_to_hub needs a Hugging Face token: log in with `hf auth login`, or set the HF_TOKEN "
                    "environment variable, or pass --hub_token."
                )
        super().__post_init__()


def default_training_arguments(output_dir: str, **overrides: Any) -> DDLTrainingArguments:
    """Training settings for small CPU runs; any `TrainingArguments` field can be overridden."""
    return DDLTrainingArguments(output_dir=output_dir, **overrides)


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """`"key=value,key=value"` -> typed overrides of `DDLConfig` fields; unknown keys and bad values raise."""
    if not text:
        return {}
    fields = {f.name: f for f in dataclasses.fields(DDLConfig)}
    overrides = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise ValueError(f"--config_overrides: {item!r} is not of the form key=value (e.g. 'value_channels=2').")
        if key not in fields:
            close = [name for name in fields if key in name or name in key]
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"--config_overrides: unknown DDLConfig key {key!r}.{hint}")
        overrides[key] = _convert_override(key, raw, fields[key].type)
    return overrides


def _convert_override(key: str, raw: str, annotation: Any) -> Any:
    allowed = _allowed_types(annotation)
    if raw.lower() in ("none", "null") and type(None) in allowed:
        return None
    try:
        value = json.loads(raw.lower() if raw.lower() in ("true", "false") else raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        value = float(value)
    if not isinstance(value, tuple(t for t in allowed if isinstance(t, type))):
        names = ", ".join(t.__name__ for t in allowed if isinstance(t, type))
        raise ValueError(f"--config_overrides: {key}={raw!r} has the wrong type; expected {names}.")
    return value


def _allowed_types(annotation: Any) -> tuple:
    if isinstance(annotation, str):
        annotation = eval(annotation, {**vars(typing), "int": int, "float": float, "str": str, "bool": bool})
    args = typing.get_args(annotation)
    types = tuple(typing.get_origin(a) or a for a in args) if args else (annotation,)
    return types + ((float,) if float in types and int not in types else ())


def check_arguments(model_args: ModelArguments, data_args: DataArguments) -> None:
    """Reject contradictory arguments before any data or model is loaded."""
    if model_args.preset is not None and model_args.model_name_or_path is not None:
        raise ValueError(
            "--preset and --model_name_or_path are mutually exclusive: use --preset to train from scratch, or "
            "--model_name_or_path to fine-tune a saved model."
        )
    if model_args.model_name_or_path is None:
        preset_config(model_args.preset or DEFAULT_PRESET, model_args.size)  # unknown preset / size
    if model_args.lora_r is not None and model_args.model_name_or_path is None:
        raise ValueError("--lora_r fine-tunes an existing model: give --model_name_or_path as well.")
    if data_args.block_size < 2:
        raise ValueError(f"--block_size={data_args.block_size} is too small; use at least 2.")


def build_model(
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, max_positions_needed: int
) -> torch.nn.Module:
    """A fresh preset model sized to the tokenizer, or a loaded checkpoint (optionally wrapped with LoRA)."""
    if model_args.model_name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=True, attn_implementation=model_args.attn_implementation
        )
        if model_args.config_overrides:
            raise ValueError("--config_overrides applies to --preset models only, not to a loaded checkpoint.")
    else:
        overrides = {
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **parse_config_overrides(model_args.config_overrides),
        }
        config = preset_config(model_args.preset or DEFAULT_PRESET, model_args.size, **overrides)
        model = DDLForCausalLM(config)
        model.set_attn_implementation(model_args.attn_implementation)
    max_positions = model.config.max_position_embeddings
    if max_positions_needed > max_positions:
        raise ValueError(
            f"--block_size={max_positions_needed} is larger than the model's max_position_embeddings="
            f"{max_positions}; lower --block_size or raise max_position_embeddings "
            "(--config_overrides max_position_embeddings=N for a new model)."
        )
    if model_args.lora_r is not None:
        model = wrap_with_lora(model, model_args)
    return model


def wrap_with_lora(model: torch.nn.Module, model_args: ModelArguments) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=[name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def causal_lm_collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack packed blocks; the labels are the inputs (the model shifts them)."""
    input_ids = torch.tensor([feature["input_ids"] for feature in features], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def greedy_sample(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (with the cache)."""
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def perplexity_metrics(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """Add `{prefix}_perplexity = exp({prefix}_loss)`."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
    return metrics


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Load data, build or load the model, train, evaluate on validation and test, and write a Hub-ready folder.

    Returns the metrics (also written as `*_results.json` in `output_dir`)."""
    check_arguments(model_args, data_args)
    set_seed(training_args.seed)
    corpus = load_corpus(
        data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        test_file=data_args.test_file,
        text_column=data_args.text_column,
        validation_split_percentage=data_args.validation_split_percentage,
        max_train_samples=data_args.max_train_samples,
    )
    if data_args.max_eval_samples is not None:
        for split in ("validation", "test"):
            corpus[split] = corpus[split].select(range(min(data_args.max_eval_samples, len(corpus[split]))))
    tokenizer_source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    with training_args.main_process_first(desc="tokenizer"):
        tokenizer = load_or_train_tokenizer(tokenizer_source, corpus, model_args.vocab_size)
    model = build_model(model_args, tokenizer, data_args.block_size)
    with training_args.main_process_first(desc="packing"):
        blocks = pack_dataset(corpus, tokenizer, data_args.block_size, num_proc=data_args.preprocessing_num_workers)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=_first_rows(blocks["validation"], data_args.eval_blocks),
        processing_class=tokenizer,
        data_collator=causal_lm_collator,
        callbacks=callbacks,
    )
    if getattr(training_args, "retain_freed_cpu_memory", False):
        retain_freed_memory_on(training_args.device)
    started = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resolve_checkpoint(training_args))
    train_seconds = time.perf_counter() - started

    metrics = dict(train_result.metrics)
    tokens_seen = int(trainer.state.num_input_tokens_seen or 0)
    metrics.update(
        train_tokens=tokens_seen,
        train_tokens_per_second=tokens_seen / max(metrics.get("train_runtime", train_seconds), 1e-9),
        parameters=count_parameters(model),
    )
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    eval_metrics = perplexity_metrics(trainer.evaluate(), "eval")
    trainer.save_metrics("eval", eval_metrics)
    test_blocks = _first_rows(blocks["test"], data_args.eval_blocks)
    test_metrics = perplexity_metrics(trainer.evaluate(test_blocks, metric_key_prefix="test"), "test")
    trainer.save_metrics("test", test_metrics)

    results = {**metrics, **eval_metrics, **test_metrics}
    if trainer.is_world_process_zero():
        records = evaluate_splits(model, tokenizer, corpus, data_args)
        save_results(records, os.path.join(training_args.output_dir, "evaluation.json"))
        for record in records:
            results[f"{record['split']}_word_perplexity"] = record["word_perplexity"]
            results[f"{record['split']}_bits_per_byte"] = record["bits_per_byte"]
    save_hub_ready_folder(trainer, tokenizer, model_args, data_args)
    if trainer.is_world_process_zero():
        plot_loss_curve(
            trainer.state.log_history,
            tokens_per_step=_tokens_per_step(training_args, data_args.block_size),
            path=os.path.join(training_args.output_dir, "loss_curve.png"),
        )
        if data_args.sample_tokens > 0:
            results["sample"] = greedy_sample(model, tokenizer, data_args.sample_prompt, data_args.sample_tokens)
    if (training_args.push_to_hub or getattr(training_args, "push_hub_ready_folder", False)) and (
        trainer.is_world_process_zero()
    ):
        from .hub import push_folder

        commit = push_folder(
            training_args.output_dir,
            training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir)),
            private=bool(training_args.hub_private_repo),
            revision=training_args.hub_revision,
            token=training_args.hub_token,
        )
        results["hub_commit_url"] = str(commit)
        print(f"Pushed {training_args.output_dir} to the Hub: {commit}")
    return results


def _first_rows(dataset, count: int | None):
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def score_with_block_windows(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    documents: list[str],
    block_size: int,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Perplexity with the windows every report of this project uses: `block_size` tokens, stride `block_size // 2`."""
    stride = max(block_size // 2, 1)
    return evaluate_perplexity(
        model, tokenizer, documents, max_length=block_size, stride=stride, batch_size=batch_size
    )


def evaluate_splits(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, corpus, data_args: DataArguments
) -> list[dict[str, Any]]:
    """Word-level perplexity and bits per byte on the validation and test text (sliding windows of `block_size`
    tokens, stride `block_size // 2`, so every token has at least half a block of context)."""
    name = data_args.dataset_name or "local"
    records = []
    model.eval()
    for split in ("validation", "test"):
        documents = corpus_documents(corpus[split], "text")
        record = score_with_block_windows(model, tokenizer, documents, data_args.block_size)
        records.append({"model": "this model", "benchmark": f"{name}:{split}", "split": split, **record})
    return records


def resolve_checkpoint(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint PATH`, or `True` for the last checkpoint in `output_dir`."""
    requested = training_args.resume_from_checkpoint
    if requested is None or str(requested).lower() in ("false", "none", ""):
        return None
    if str(requested).lower() != "true":
        if not os.path.isdir(requested):
            raise FileNotFoundError(f"--resume_from_checkpoint {requested}: no such checkpoint folder.")
        return requested
    last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if last is None:
        raise FileNotFoundError(
            f"--resume_from_checkpoint True: no checkpoint-* folder in {training_args.output_dir}; train with "
            "--save_strategy steps --save_steps N to write checkpoints."
        )
    return last


def _tokens_per_step(training_args: TrainingArguments, block_size: int) -> int:
    return (
        training_args.train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
        * (block_size)
    )


def save_hub_ready_folder(
    trainer: Trainer, tokenizer: PreTrainedTokenizerBase, model_args: ModelArguments, data_args: DataArguments
) -> None:
    """Weights (safetensors), config with `auto_map`, code files, tokenizer, generation config and a model card.

    Only the main process writes; for LoRA the folder holds the adapter (it names its base model)."""
    output_dir = trainer.args.output_dir
    model = trainer.model
    trainer.save_model(output_dir)  # every process must join (FSDP / DeepSpeed gather the weights here)
    if not trainer.is_world_process_zero():
        return
    pickled_args = os.path.join(output_dir, "training_args.bin")
    if os.path.exists(pickled_args):  # the Hub-ready folder holds no pickles
        os.remove(pickled_args)
    with open(os.path.join(output_dir, "training_args.json"), "w") as handle:
        handle.write(trainer.args.to_json_string())
    tokenizer.save_pretrained(output_dir)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_length=base.config.max_position_embeddings,
    )
    generation_config.save_pretrained(output_dir)
    training_record = {
        "preset": model_args.preset or (None if model_args.model_name_or_path else DEFAULT_PRESET),
        "size": model_args.size if model_args.model_name_or_path is None else None,
        "base_model": model_args.model_name_or_path,
        "lora_r": model_args.lora_r,
        "dataset": data_args.dataset_name or data_args.train_file,
        "block_size": data_args.block_size,
        "tokens_per_step": _tokens_per_step(trainer.args, data_args.block_size),
        "max_steps": trainer.state.max_steps,
        "global_step": trainer.state.global_step,
        "train_tokens": int(trainer.state.num_input_tokens_seen or 0),
        "seed": trainer.args.seed,
        "hardware": describe_hardware(),
    }
    with open(os.path.join(output_dir, "training_record.json"), "w") as handle:
        json.dump(training_record, handle, indent=2)
    from .hub import write_model_card

    write_model_card(output_dir)


def describe_hardware() -> str:
    """A one-line description of the accelerator or CPU this process runs on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    cpu = "CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{os.cpu_count()} cores of {cpu}"


__all__ = [
    "DDLTrainingArguments",
    "DataArguments",
    "ModelArguments",
    "build_model",
    "causal_lm_collator",
    "default_training_arguments",
    "parse_config_overrides",
    "run_training",
]
