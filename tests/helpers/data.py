"""Shared fixtures for the data tests: a small corpus, a tiny sentencepiece model and shards, each built
once per session (module-level cache, so it also holds when several test modules import these)."""
import argparse
import os

import pytest

from pipeline.data import corpus, preprocess, tokenizer

_CACHE = {}
TINY_VOCAB = 600


def _build(root):
    corpus_dir = os.path.join(root, "corpus")
    files = corpus.write_corpus(corpus_dir, max_bytes=400_000, num_files=4)
    texts = (line for f in files for line in open(f, encoding="utf-8"))
    spm_path = tokenizer.train(texts, os.path.join(root, "tok", "spm"), vocab_size=TINY_VOCAB, sample_size=5000)
    shard_dir = os.path.join(root, "shards")
    preprocess.preprocess(preprocess_args([str(f) for f in files], spm_path, shard_dir), 0, 1)
    return {"root": root, "corpus_files": [str(f) for f in files], "spm": spm_path, "shards": shard_dir}


def preprocess_args(inputs, spm_path, output_dir, **overrides):
    """The argparse namespace `deberta-ds preprocess` would build (defaults of the tests: small shards)."""
    values = dict(input=list(inputs), dataset=None, dataset_config=None, dataset_split="train", text_field="text",
                  max_line_bytes=1 << 20, tokenizer=spm_path, output_dir=output_dir, max_seq_len=64, workers=1,
                  num_shards=None, shard_index=None, split_by="auto", shard_tokens=20_000, no_progress=True)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture(scope="session")
def data_env(tmp_path_factory):
    if "env" not in _CACHE:
        _CACHE["env"] = _build(str(tmp_path_factory.mktemp("data")))
    return _CACHE["env"]


@pytest.fixture(scope="session")
def spm_path(data_env):
    return data_env["spm"]


@pytest.fixture(scope="session")
def tok(spm_path):
    return tokenizer.Tokenizer(spm_path)
