"""The run config of pretraining (pipeline/train/config.py) and what `deberta-ds pretrain` checks before DeepSpeed
starts (pipeline/train/preflight.py), in process."""
import argparse
import json

import pytest

from pipeline.errors import ConfigError, DataError
from pipeline.train import pretrain
from pipeline.train.config import RunConfig
from pipeline.train.preflight import dp_size_of, prepare


def args_of(*argv):
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_shipped_configs_load_by_name_with_overrides():
    run = RunConfig.from_file("tiny_cpu", ["lr=1e-3", "model_overrides.num_hidden_layers=3", "mode=pipeline",
                                           "pipeline_stages=2"])
    assert run.lr == 1e-3 and run.model_config().num_hidden_layers == 3 and run.mode == "pipeline"
    assert run.model_config().vocab_size == 1100   # the file's own model_overrides stay
    xxl = RunConfig.from_file("xxlarge").model_config()
    assert (xxl.hidden_size, xxl.num_hidden_layers, xxl.vocab_size) == (1536, 48, 128100)


@pytest.mark.parametrize("override, message", [
    ("max_steps=abc", 'max_steps: expected an integer, got "abc"'),
    ("max_steps=1.5", "max_steps: expected an integer, got 1.5"),
    ("lr=abc", 'lr: expected a number, got "abc"'),
    ("modell=tiny", "unknown setting 'modell' (did you mean 'model'?)"),
    ("model_overrides.hiden_size=32", "model_overrides: unknown setting 'hiden_size' (did you mean 'hidden_size'?)"),
    ("model_overrides.num_hidden_layers=two", 'model_overrides: num_hidden_layers: expected an integer, got "two"'),
    ("model_overrides.hidden_size=63", "hidden_size 63 is not divisible by num_attention_heads 4"),
    ("model=huge", "model: unknown preset 'huge'"),
    ("mode=tensor", "mode 'tensor' is not one of ('zero3', 'pipeline')"),
    ("pipeline_stages=2", "pipeline_stages=2 needs mode 'pipeline'"),
    ("save_interval=0", "save_interval must be at least 1, got 0"),
    ("sequence_parallel_size=0", "sequence_parallel_size must be at least 1, got 0"),
    ("sequence_parallel_size=3", "sequence_parallel_size 3 does not divide the 4 attention heads"),
    ("lr=-1", "lr must not be negative, got -1.0"),
    ("adam_betas=[0.9]", "adam_betas must be two numbers in [0, 1)"),
    ("optimizer=sgd", "optimizer 'sgd' is not one of"),
    ("objective=electra", "objective 'electra' is not one of ('mlm', 'rtd')"),
    ("embedding_sharing=tied", "embedding_sharing 'tied' is not one of ('gdes', 'es', 'none')"),
    ("rtd_lambda=-1", "rtd_lambda and generator_layers must not be negative"),
])
def test_bad_settings_are_refused_naming_the_setting(override, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_file("tiny_cpu", [override])
    assert message in str(error.value)
    assert "pretrain_tiny_cpu.json" in str(error.value)


def test_preflight_checks_data_tokenizer_world_and_batch(tmp_path, data_env):
    shards = data_env["shards"]
    ok = args_of("--config", "tiny_cpu", "--deepspeed", "cpu_zero3_fp32", "--data-dir", shards,
                 "--output-dir", str(tmp_path / "run"))
    run, ds = prepare(ok, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert run.data_dir == shards and run.tokenizer_path().endswith("spm.model")
    with pytest.raises(DataError, match="does not exist"):
        prepare(args_of("--config", "tiny_cpu", "--deepspeed", "cpu_zero3_fp32", "--data-dir", str(tmp_path / "x"),
                        "--output-dir", str(tmp_path / "run")), 1)
    with pytest.raises(ConfigError, match="global_batch_size 8 is not a multiple of micro_batch_size 4 x data-parallel size 3"):
        prepare(ok, world_size=3)
    with pytest.raises(ConfigError, match="no output directory"):
        prepare(args_of("--config", "tiny_cpu", "--deepspeed", "cpu_zero3_fp32", "--data-dir", shards), 1)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by pipeline_stages 2"):
        dp_size_of(RunConfig(mode="pipeline", pipeline_stages=2), 3)
    release = args_of("--config", "tiny_cpu", "--deepspeed", "cpu_zero3_fp32", "--data-dir", shards, "--output-dir",
                      str(tmp_path / "run"), "--set", f"init_from_release={json.dumps(str(tmp_path / 'none'))}")
    with pytest.raises(ConfigError, match="init_from_release .*: no such release directory"):
        prepare(release, 1)


def test_rtd_settings_are_checked_against_the_model_and_the_mode():
    run = RunConfig.from_file("tiny_cpu", ["objective=rtd"])
    assert run.generator_config().num_hidden_layers == 1 and run.model_config().num_hidden_layers == 2
    with pytest.raises(ConfigError, match="generator_layers 3 is deeper than the discriminator's 2 layers"):
        RunConfig.from_file("tiny_cpu", ["objective=rtd", "generator_layers=3"])
    with pytest.raises(ConfigError, match="objective 'rtd' runs in mode 'zero3' only: DeepSpeed's pipeline engine"):
        RunConfig.from_file("tiny_cpu", ["objective=rtd", "mode=pipeline"])
    v3 = RunConfig.from_file("v3_large")
    assert (v3.objective, v3.embedding_sharing, v3.rtd_lambda, v3.generator_config().num_hidden_layers) == ("rtd", "gdes", 10.0, 12)


def test_sequence_parallel_is_refused_in_pipeline_mode_and_divides_the_world():
    with pytest.raises(ConfigError, match="sequence_parallel_size 2 needs mode 'zero3'"):
        RunConfig.from_file("tiny_cpu", ["mode=pipeline", "pipeline_stages=2", "sequence_parallel_size=2"])
    run = RunConfig.from_file("tiny_cpu", ["sequence_parallel_size=2"])
    assert dp_size_of(run, 4) == 2
    with pytest.raises(ConfigError, match="world size 3 is not divisible by sequence_parallel_size 2"):
        dp_size_of(run, 3)


def test_the_position_table_follows_longer_data_and_nothing_else():
    run = RunConfig.from_file("tiny_cpu")  # 128 positions, the EMD on
    assert run.fitted_to(128) == (run, None)
    longer, notice = run.fitted_to(8192)
    config = longer.model_config()
    assert (config.max_position_embeddings, config.max_relative, config.att_span) == (8192, 128, 32)
    assert longer.model_overrides["max_position_embeddings"] == 8192 and "128 to 8192 rows" in notice
    assert longer.generator_config().max_position_embeddings == 8192  # rtd: the generator carries the EMD
    no_table = RunConfig.from_file("tiny_cpu", ["emd=false"])
    assert no_table.fitted_to(8192) == (no_table, None)  # no absolute positions anywhere: nothing to grow


def test_a_release_whose_relative_positions_differ_is_refused_when_its_table_grows(tmp_path):
    import torch
    from model import DebertaForMaskedLM, preset
    from pipeline.errors import ReleaseError
    from pipeline.release import save_release
    from pipeline.train.zero3 import load_release_into
    short = DebertaForMaskedLM(preset("tiny", vocab_size=1000), emd=True)  # 128 positions
    save_release(short, str(tmp_path / "rel"))
    # the table grows; max_relative_positions -1 would follow the 256 positions and move the log buckets
    with pytest.raises(ReleaseError, match="relative positions span 128 in 32 buckets, the run's 256 .*"
                                           "max_relative_positions=128"):
        load_release_into(DebertaForMaskedLM(preset("tiny", vocab_size=1000, max_position_embeddings=256)),
                          str(tmp_path / "rel"), stage=0, rank=0)
    longer = DebertaForMaskedLM(preset("tiny", vocab_size=1000, max_position_embeddings=256,
                                       max_relative_positions=128))
    fresh = longer.deberta.embeddings.position_embeddings.weight.detach().clone()
    load_release_into(longer, str(tmp_path / "rel"), stage=0, rank=0)
    table = longer.deberta.embeddings.position_embeddings.weight
    assert torch.equal(table[:128], short.deberta.embeddings.position_embeddings.weight)
    assert torch.equal(table[128:], fresh[128:])
