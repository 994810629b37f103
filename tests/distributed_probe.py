"""Run by `torchrun --nproc_per_node 2` in test_training: trains on two CPU processes and records, per rank,
which training blocks it saw and whether it wrote the model card."""

import json
import sys
from pathlib import Path

import ddl_transformers.hub as hub
import ddl_transformers.training as training

output = Path(sys.argv[1])
seen_blocks: list[str] = []
wrote_card = []


def recording_collator(features):
    seen_blocks.extend(" ".join(map(str, f["input_ids"][:8])) for f in features)
    return collate(features)


def recording_card_writer(folder, repo_id=None):
    wrote_card.append(str(folder))
    return write_card(folder, repo_id)


wrapping = {}


class RecordingTrainer(training.Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        wrapping.setdefault("fsdp", bool(self.is_fsdp_enabled))
        wrapping.setdefault("wrapped", type(self.model_wrapped).__name__)
        wrapping.setdefault("layer", type(self.model.model.layers[0]).__name__)
        return super().training_step(model, inputs, num_items_in_batch)


collate, write_card = training.causal_lm_collator, hub.write_model_card
training.causal_lm_collator = recording_collator
hub.write_model_card = recording_card_writer
training.Trainer = RecordingTrainer

model_args = training.ModelArguments(
    preset="ddl-cc",
    config_overrides="hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,"
    "max_position_embeddings=64",
    vocab_size=300,
)
data_args = training.DataArguments(
    dataset_name="ptb", block_size=32, max_train_samples=300, max_eval_samples=20, sample_tokens=0
)
training_args = training.DDLTrainingArguments(
    output_dir=str(output / "ddp"),
    per_device_train_batch_size=4,
    max_steps=3,
    eval_strategy="no",
    report_to="none",
    disable_tqdm=True,
    ddp_backend="gloo",
)
training.run_training(model_args, data_args, training_args)
state = training_args.distributed_state
record = {
    "rank": training_args.process_index,
    "world_size": training_args.world_size,
    "distributed_type": str(state.distributed_type).split(".")[-1],
    "blocks": seen_blocks,
    "wrote_card": bool(wrote_card),
    **wrapping,
}
(output / f"rank{training_args.process_index}.json").write_text(json.dumps(record))
