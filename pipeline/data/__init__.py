"""Text to training batches: the tokenizer, corpus sources, the demo corpus, the shard format, preprocessing
into shards, and the pretraining loader with its masking."""
