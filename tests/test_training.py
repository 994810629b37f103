"""Training and fine-tuning with Trainer: Hub-ready output, resume, LoRA, two-process DDP, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainerCallback

from ddl_transformers import allocator
from ddl_transformers.training import (
    DataArguments,
    DDLTrainingArguments,
    ModelArguments,
    parse_config_overrides,
    run_training,
)

REPO = Path(__file__).resolve().parent.parent
MICRO = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,max_position_embeddings=64"


def micro_args(output_dir, preset="ddl-cc", max_steps=4, **training):
    model_args = ModelArguments(preset=preset, config_overrides=MICRO, vocab_size=300)
    data_args = DataArguments(
        dataset_name="ptb", block_size=32, max_train_samples=300, max_eval_samples=40, sample_tokens=4
    )
    settings = {
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "max_steps": max_steps,
        "eval_steps": 2,
        "logging_steps": 1,
        "warmup_steps": 0,
        "report_to": "none",
        "disable_tqdm": True,
        **training,
    }
    return model_args, data_args, DDLTrainingArguments(output_dir=str(output_dir), **settings)


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    results = run_training(*micro_args(folder))
    return folder, results


def test_output_folder_is_hub_ready(trained_folder):
    folder, results = trained_folder
    files = {p.name for p in folder.iterdir()}
    expected = {
        "model.safetensors",
        "config.json",
        "configuration_ddl.py",
        "modeling_ddl.py",
        "delta_ops.py",
        "state_tape.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
        "loss_curve.png",
        "train_results.json",
        "eval_results.json",
        "test_results.json",
        "training_record.json",
    }
    assert expected <= files, expected - files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ddl.DDLForCausalLM"
    assert config["vocab_size"] == 300 and config["hidden_size"] == 32
    eval_metrics = json.loads((folder / "eval_results.json").read_text())
    assert eval_metrics["eval_perplexity"] == pytest.approx(torch.tensor(eval_metrics["eval_loss"]).exp().item())
    assert results["train_tokens"] == 4 * 4 * 32
    assert "model-index" in (folder / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    weights = load_file(folder / "model.safetensors")
    torch.testing.assert_close(model.model.embed_tokens.weight, weights["model.embed_tokens.weight"])


def test_arguments_from_a_yaml_file(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text(
        "preset: ddl-tc\nsize: tiny\ndataset_name: shakespeare\nblock_size: 64\noutput_dir: out\nmax_steps: 7\n"
    )
    model_args, data_args, training_args = HfArgumentParser(
        (ModelArguments, DataArguments, DDLTrainingArguments)
    ).parse_yaml_file(str(path))
    assert (model_args.preset, data_args.dataset_name, data_args.block_size) == ("ddl-tc", "shakespeare", 64)
    assert training_args.max_steps == 7 and training_args.learning_rate == 2e-3


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated interruption")


def test_resume_from_checkpoint_finishes_with_the_same_weights(tmp_path):
    checkpointing = {"save_strategy": "steps", "save_steps": 3, "eval_strategy": "no", "sample_tokens": 0}
    checkpointing.pop("sample_tokens")
    run_training(*micro_args(tmp_path / "straight", max_steps=6, **checkpointing))

    interrupted = micro_args(tmp_path / "resumed", max_steps=6, **checkpointing)
    with pytest.raises(KeyboardInterrupt):
        run_training(*interrupted, callbacks=[StopAfter(4)])
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()
    resumed = micro_args(tmp_path / "resumed", max_steps=6, resume_from_checkpoint="True", **checkpointing)
    run_training(*resumed)

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    again = load_file(tmp_path / "resumed" / "model.safetensors")
    for name, value in straight.items():
        torch.testing.assert_close(again[name], value, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("retain", [True, False])
def test_cpu_training_retains_freed_memory_unless_told_not_to(tmp_path, monkeypatch, retain):
    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append("retained") or True)
    run_training(*micro_args(tmp_path, max_steps=1, eval_strategy="no", use_cpu=True, retain_freed_cpu_memory=retain))
    assert calls == (["retained"] if retain else [])


def test_lora_fine_tuning_saves_an_adapter_that_loads_back(trained_folder, tmp_path):
    from peft import PeftModel

    base_folder, _ = trained_folder
    model_args = ModelArguments(model_name_or_path=str(base_folder), lora_r=4)
    _, data_args, training_args = micro_args(tmp_path / "lora", max_steps=3, learning_rate=5e-2, eval_strategy="no")
    data_args.dataset_name = "shakespeare"
    run_training(model_args, data_args, training_args)
    lora_folder = tmp_path / "lora"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in lora_folder.iterdir()
    }
    base = AutoModelForCausalLM.from_pretrained(base_folder, trust_remote_code=True).eval()
    tokens = torch.arange(3, 19).unsqueeze(0)
    base_logits = base(tokens).logits
    adapted = PeftModel.from_pretrained(base, lora_folder).eval()
    adapted_logits = adapted(tokens).logits
    assert not torch.allclose(adapted_logits, base_logits)  # the adapter was trained and applied
    merged_again = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_folder, trust_remote_code=True), lora_folder
    ).eval()
    torch.testing.assert_close(merged_again(tokens).logits, adapted_logits)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dataset_name": "ptbb"}, "'ptb', 'shakespeare'"),
        ({"dataset_name": None, "train_file": "/nonexistent/corpus.txt"}, "/nonexistent/corpus.txt"),
        ({"block_size": 128}, "max_position_embeddings"),
        ({"config_overrides": MICRO + ",value_chanels=2"}, "value_chanels"),
        ({"config_overrides": MICRO + ",value_channels=two"}, "value_channels"),
        ({"config_overrides": MICRO + ",beta_init=5"}, "beta_init"),
        ({"model_name_or_path": "some/model"}, "mutually exclusive"),
        ({"preset": "ddl-zz"}, "ddl-cc-noec"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, change, message):
    model_args, data_args, training_args = micro_args(tmp_path / "bad")
    for key, value in change.items():
        setattr(model_args if hasattr(model_args, key) else data_args, key, value)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_training(model_args, data_args, training_args)
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_empty_file_and_too_small_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    model_args, data_args, training_args = micro_args(tmp_path / "bad")
    data_args.dataset_name, data_args.train_file = None, str(empty)
    with pytest.raises(ValueError, match="empty"):
        run_training(model_args, data_args, training_args)
    small = tmp_path / "small.txt"
    small.write_text("\n".join(f"line {i} of a tiny corpus" for i in range(60)))
    data_args.train_file, data_args.block_size = str(small), 64
    model_args.config_overrides = MICRO.replace("max_position_embeddings=64", "max_position_embeddings=128")
    with pytest.raises(ValueError, match="block_size"):
        run_training(model_args, data_args, training_args)


def test_config_overrides_are_typed():
    assert parse_config_overrides("value_channels=2,beta_init=1,embedding_expansion=false,beta_hidden_size=none") == {
        "value_channels": 2,
        "beta_init": 1.0,
        "embedding_expansion": False,
        "beta_hidden_size": None,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_config_overrides("value_channels")


PROBE = REPO / "tests" / "distributed_probe.py"


@pytest.mark.slow
def test_two_process_ddp_run(tmp_path):
    command = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    completed = subprocess.run(
        [sys.executable, *command, str(PROBE), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["distributed_type"] == "MULTI_CPU" and r["world_size"] == 2 for r in ranks), ranks[0]
    assert all(r["wrapped"] == "DistributedDataParallel" for r in ranks)  # real DDP: gradients are all-reduced
    assert ranks[0]["blocks"] and ranks[1]["blocks"]
    assert not set(ranks[0]["blocks"]) & set(ranks[1]["blocks"])  # different shards
    assert ranks[0]["wrote_card"] and not ranks[1]["wrote_card"]  # only rank 0 writes the folder
    folder = tmp_path / "ddp"
    assert json.loads((folder / "train_results.json").read_text())["train_tokens"] == 2 * 3 * 4 * 32
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert torch.isfinite(model(torch.arange(4, 12).unsqueeze(0)).logits).all()
    trained = load_file(folder / "model.safetensors")
    assert trained["model.norm.weight"].ne(1.0).any()  # the gathered weights are the trained ones
