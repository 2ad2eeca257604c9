"""Everything that moves data and state around the DeBERTa model: tokenizer, shards, loader,
DeepSpeed engines, pretraining, fine-tuning, conversion and launch-environment discovery."""
