"""Pretraining on sequences longer than the model's absolute position table (the EMD's): the run's model config
grows the table to the data's length (recorded in the checkpoint, so the release has it), for a new run and for
one started from a shorter release (its rows copied, the rest initialised, said in one line)."""
import json

import pytest
import torch

from model import DebertaForMaskedLM, preset
from pipeline.release.read import read_state_dict
from pipeline.release.write import write_config
from tests.helpers.launch import NO_DROPOUT, cli, explain, pretrain

LONG = 256  # the tiny run's model has 128 positions (configs/pretrain_tiny_cpu.json)
SHORT = NO_DROPOUT + ["max_steps=1", "save_interval=1", "global_batch_size=2", "micro_batch_size=2"]


@pytest.fixture(scope="module")
def long_shards(tiny_shards, tmp_path_factory):
    """One corpus file as shards of 256 tokens, with the tiny shards' tokenizer."""
    work = tiny_shards.parent
    first = sorted((work / "corpus").iterdir())[0]
    out = tmp_path_factory.mktemp("long") / "shards"
    result = cli("preprocess", "--input", str(first), "--tokenizer", str(work / "spm.model"), "--output-dir",
                 str(out), "--max-seq-len", str(LONG), "--workers", "1", "--no-progress")
    assert result.returncode == 0, explain(result)
    return out


def test_shards_of_8192_tokens_give_masked_batches_of_8192(tiny_shards, tmp_path):
    """Preprocessing and the loader at 8192 tokens (int32 token ids, no length limit): full rows, the masking
    budget scaled to the length (15%), predictions far beyond position 512."""
    from pipeline.data.mlm_loader import build_pretrain_loader
    work = tiny_shards.parent
    first = sorted((work / "corpus").iterdir())[0]
    result = cli("preprocess", "--input", str(first), "--tokenizer", str(work / "spm.model"), "--output-dir",
                 str(tmp_path / "shards"), "--max-seq-len", "8192", "--workers", "1", "--no-progress")
    assert result.returncode == 0, explain(result)
    for masking in ("mlm", "rtd"):
        loader = build_pretrain_loader(str(tmp_path / "shards"), str(work / "spm.model"), 2, 0, 1, seed=1,
                                       masking=masking)
        assert loader.max_seq_len == 8192 and len(loader.data) >= 2
        batch = next(iter(loader))
        full = int(batch["attention_mask"].sum(1).argmax())  # a shard's last sample is its shorter remainder
        assert batch["input_ids"].shape == (2, 8192) and bool(batch["attention_mask"][full].all())
        predicted = (batch["labels"][full] != -100).nonzero().flatten()
        assert 0.12 * 8192 < len(predicted) <= 0.15 * 8192 + 20 and predicted.max() > 4096


def saved_model_config(out):
    meta = json.loads((out / "checkpoints" / "global_step1" / "deberta_ds.json").read_text())
    return meta["model_config"], meta["run_config"]["model_overrides"]


def test_a_release_of_128_positions_starts_a_256_token_run(long_shards, tmp_path):
    config = preset("tiny", vocab_size=1100, max_position_embeddings=128)
    torch.manual_seed(3)
    model = DebertaForMaskedLM(config, emd=True)
    (tmp_path / "rel").mkdir()
    write_config(str(tmp_path / "rel"), config, "mlm", torch.float32)
    torch.save(model.state_dict(), tmp_path / "rel" / "pytorch_model.bin")
    out = tmp_path / "run"
    result = pretrain(long_shards, out, nproc=1, sets=SHORT + [f"init_from_release={tmp_path / 'rel'}", "lr=0"])
    assert result.returncode == 0, explain(result)
    assert "absolute position table grows from 128 to 256 rows" in result.stderr
    assert "has 128 absolute positions, the run 256: rows 0-127" in result.stderr
    saved, overrides = saved_model_config(out)
    assert saved["max_position_embeddings"] == 256 and saved["max_relative_positions"] == 128
    assert overrides["max_position_embeddings"] == 256
    assert cli("convert", "to-release", "--checkpoint", str(out / "checkpoints"), "--output",
               str(tmp_path / "out")).returncode == 0
    table = read_state_dict(str(tmp_path / "out"))["deberta.embeddings.position_embeddings.weight"]
    assert table.shape == (256, 64)
    assert torch.equal(table[:128], model.deberta.embeddings.position_embeddings.weight.detach())  # lr 0


def test_an_rtd_run_on_256_tokens_grows_the_generators_table(long_shards, tmp_path):
    out = tmp_path / "run"
    result = pretrain(long_shards, out, nproc=1, sets=SHORT + ["objective=rtd", "rtd_training=joint"])
    assert result.returncode == 0, explain(result)
    saved, _ = saved_model_config(out)
    assert saved["max_position_embeddings"] == 256 and saved["max_relative_positions"] == 128
