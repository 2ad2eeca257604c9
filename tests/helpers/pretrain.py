"""The pretraining tests' fixtures: a tiny corpus -> tokenizer -> shards (once per session), validation shards,
and the `--set` items of a held-out evaluation. Runs are started by tests/helpers/launch.py."""
import json

import pytest

from tests.helpers.launch import cli, explain


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """The embedded corpus through the real pipeline: corpus -> tokenizer (1000 pieces) -> 128-token shards."""
    work = tmp_path_factory.mktemp("pretrain_data")
    for args in (["corpus", "--output", str(work / "corpus"), "--max-bytes", "400000"],
                 ["tokenizer", "train", "--input", str(work / "corpus" / "*"), "--output", str(work / "spm"),
                  "--vocab-size", "1000"],
                 ["preprocess", "--input", str(work / "corpus" / "*"), "--tokenizer", str(work / "spm.model"),
                  "--output-dir", str(work / "shards"), "--max-seq-len", "128", "--workers", "1", "--no-progress"]):
        result = cli(*args)
        assert result.returncode == 0, explain(result)
    return work / "shards"


@pytest.fixture(scope="session")
def valid_shards(tiny_shards):
    """Validation shards: one corpus file through `preprocess` again (held-out data in a real run; here it
    overlaps the training data, which the evaluation mechanics do not care about)."""
    work = tiny_shards.parent
    first = sorted((work / "corpus").iterdir())[0]
    result = cli("preprocess", "--input", str(first), "--tokenizer", str(work / "spm.model"), "--output-dir",
                 str(work / "valid"), "--max-seq-len", "128", "--workers", "1", "--no-progress")
    assert result.returncode == 0, explain(result)
    return work / "valid"


def eval_sets(valid_dir, interval=2, steps=1):
    return [f"valid_data_dir={json.dumps(str(valid_dir))}", f"eval_interval={interval}", f"eval_steps={steps}"]
