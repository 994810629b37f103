#!/usr/bin/env python
"""Train a DDL preset from scratch, or fine-tune a saved DDL model, with the Hugging Face Trainer.

python scripts/train.py --preset ddl-cc --size tiny --dataset_name ptb --output_dir outputs/ddl-cc
python scripts/train.py --model_name_or_path outputs/ddl-cc --lora_r 8 --dataset_name shakespeare ...
python scripts/train.py args.yaml            # every argument from one JSON or YAML file
torchrun --nproc_per_node 2 scripts/train.py ...   # or: accelerate launch --config_file scripts/accelerate/ddp.yaml
"""

from ddl_transformers.cli import parse_arguments, run_script
from ddl_transformers.training import DataArguments, DDLTrainingArguments, ModelArguments, run_training


def main() -> None:
    model_args, data_args, training_args = parse_arguments((ModelArguments, DataArguments, DDLTrainingArguments))
    results = run_training(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(f"\nvalidation perplexity (tokens): {results['eval_perplexity']:.2f}")
        print(f"test perplexity (tokens):       {results['test_perplexity']:.2f}")
        for key in ("validation_word_perplexity", "test_word_perplexity"):
            if key in results:
                print(f"{key.replace('_', ' ')}: {results[key]:.2f}")
        if "sample" in results:
            print(f"greedy sample: {data_args.sample_prompt!r} -> {results['sample']!r}")
        print(f"Hub-ready folder: {training_args.output_dir}")


if __name__ == "__main__":
    run_script(main)
