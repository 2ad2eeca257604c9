"""The DeepSpeed config of a run, one rule for both trainers (pipeline/run/ds_config.py), and each mode's own checks."""
import os
import re

import pytest

from pipeline.run import ds_config
from pipeline.run.ds_config import KNOWN_KEYS, batch_fields, complete_ds_config, load_ds_config
from pipeline.errors import ConfigError
from pipeline.train.config import RunConfig
from pipeline.train.preflight import complete_for_run

OWNED = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}


def test_owned_fields_absent_or_auto_are_filled_and_equal_ones_kept():
    done = complete_ds_config({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4}, OWNED, "ds.json",
                              "the run config")
    assert {k: done[k] for k in OWNED} == OWNED


def test_an_owned_field_with_another_value_is_refused_naming_both():
    with pytest.raises(ConfigError, match="ds.json: train_batch_size is 32 but the run config gives 16"):
        complete_ds_config({"train_batch_size": 32}, OWNED, "ds.json", "the run config")


def test_optimizer_scheduler_and_leftover_auto_are_refused():
    for section in ("optimizer", "scheduler"):
        with pytest.raises(ConfigError, match=f"remove the '{section}' section"):
            complete_ds_config({section: {"type": "Adam"}}, OWNED, "ds.json", "the run config")
    with pytest.raises(ConfigError, match='gradient_clipping is "auto" but the run config does not set it'):
        complete_ds_config({"gradient_clipping": "auto"}, OWNED, "ds.json", "the run config")
    with pytest.raises(ConfigError, match="both fp16 and bf16 are enabled"):
        complete_ds_config({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, OWNED, "ds.json", "x")


def test_batch_fields_need_whole_micro_batches_per_rank():
    assert batch_fields(16, 4, 2) == OWNED
    with pytest.raises(ConfigError, match="global_batch_size 6 is not a multiple of micro_batch_size 4 x data-parallel size 1"):
        batch_fields(6, 4, 1)


def test_an_unknown_top_level_key_is_refused_with_the_closest_known_one(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"gradient_clippingg": 1.0}')
    with pytest.raises(ConfigError, match=r"unknown DeepSpeed setting 'gradient_clippingg' \(did you mean "
                       r"'gradient_clipping'\?\); DeepSpeed would ignore it"):
        load_ds_config(str(path))
    with pytest.raises(ConfigError, match="unknown DeepSpeed setting 'zero_optimisation'"):
        load_ds_config("zero3_bf16", ["zero_optimisation.stage=2"])
    ds, source = load_ds_config("zero3_bf16", ["zero_optimization.stage=2"])
    assert ds["zero_optimization"]["stage"] == 2 and "comment" not in ds and source.endswith("zero3_bf16.json")


def test_every_known_key_is_read_by_the_installed_deepspeed_and_the_shipped_configs_pass():
    import deepspeed
    root = os.path.dirname(deepspeed.__file__)
    source = ""
    for folder, _, files in os.walk(root):
        source += "".join(open(os.path.join(folder, f), encoding="utf-8", errors="ignore").read()
                          for f in files if f.endswith(".py"))
    missing = [k for k in KNOWN_KEYS if not re.search(rf"['\"]{k}['\"]", source)]
    assert not missing, missing
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "ds_configs")
    for name in os.listdir(shipped):
        load_ds_config(os.path.join(shipped, name))


def test_the_run_config_completion_adds_each_modes_own_checks():
    run = RunConfig(model="tiny", global_batch_size=8, micro_batch_size=4)
    ds, _ = load_ds_config("cpu_zero3_fp32")
    done = complete_for_run(run, ds, 2, "cpu_zero3_fp32")
    assert done["gradient_accumulation_steps"] == 1 and "pipeline" not in done
    pipe = RunConfig(model="tiny", global_batch_size=8, micro_batch_size=4, mode="pipeline", pipeline_stages=2)
    with pytest.raises(ConfigError, match="ZeRO stage 3 with mode 'pipeline'"):
        complete_for_run(pipe, ds, 1, "cpu_zero3_fp32")
    done = complete_for_run(pipe, load_ds_config("cpu_pipeline_fp32")[0], 1, "x")
    assert done["pipeline"]["use_reentrant"] is False and done["gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match="offload_optimizer to CPU needs optimizer 'cpu_adam'"):
        complete_for_run(run, load_ds_config("zero3_offload_bf16")[0], 2, "x")
    assert ds_config.precision(load_ds_config("zero3_bf16")[0]) == "bf16" and ds_config.zero_stage(ds) == 3


def test_a_typo_inside_a_section_is_refused_with_its_dotted_path_and_the_closest_accepted_name(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"fp16": {"enabledd": true}}')
    with pytest.raises(ConfigError, match=rf"^{path}: unknown DeepSpeed setting 'fp16.enabledd' \(did you mean "
                       r"'enabled'\?\); DeepSpeed \S+ would refuse it when the run starts$"):
        load_ds_config(str(path))
    for override, message in [
        ("zero_optimization.stgae=3", "'zero_optimization.stgae' (did you mean 'stage'?)"),
        ('zero_optimization.offload_optimizer.devcie="cpu"', "'zero_optimization.offload_optimizer.devcie' (did you mean 'device'?)"),
        ("zero_optimization.stage3_prefetch_bucket_sise=1", "(did you mean 'stage3_prefetch_bucket_size'?)"),
        ("bf16.enabeld=true", "'bf16.enabeld' (did you mean 'enabled'?)"),
        ('tensorboard.output_pth="tb"', "'tensorboard.output_pth' (did you mean 'output_path'?)"),
    ]:
        with pytest.raises(ConfigError) as error:
            load_ds_config("zero3_bf16", [override])
        assert str(error.value).startswith(f"{ds_config.config_file('zero3_bf16', 'deepspeed')} with --ds: unknown "
                                           f"DeepSpeed setting ") and message in str(error.value), str(error.value)


def test_a_field_is_accepted_by_its_name_and_by_its_alias_and_a_bad_value_is_refused_naming_it():
    ds, _ = load_ds_config("cpu_zero3_fp32", ["zero_optimization.prefetch_bucket_size=5",
                                              'zero_optimization.offload_param.device="cpu"'])
    assert ds["zero_optimization"]["prefetch_bucket_size"] == 5
    ds, _ = load_ds_config("zero3_bf16")  # the alias, from the file
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 30000000
    with pytest.raises(ConfigError, match=r"'zero_optimization.prefetch_bucket_size' is given twice, also as "
                       r"'zero_optimization.stage3_prefetch_bucket_size' \(one is the other's alias\)"):
        load_ds_config("zero3_bf16", ["zero_optimization.prefetch_bucket_size=5"])
    with pytest.raises(ConfigError, match=r"DeepSpeed setting 'zero_optimization.offload_optimizer.device': Input "
                       r"should be 'none', 'cpu' or 'nvme' \(got 'gpu'\)"):
        load_ds_config("zero3_bf16", ['zero_optimization.offload_optimizer.device="gpu"'])
    with pytest.raises(ConfigError, match=r"DeepSpeed setting 'fp16.loss_scale': fp16.loss_scale must be >= 0"):
        load_ds_config("zero3_bf16", ["bf16.enabled=false", "fp16.loss_scale=-1"])


@pytest.mark.parametrize("override, shown", [("gradient_clipping=NaN", "'gradient_clipping' is NaN"),
                                             ("zero_optimization.reduce_bucket_size=Infinity",
                                              "'zero_optimization.reduce_bucket_size' is Infinity"),
                                             ("gradient_clipping=-1e999", "'gradient_clipping' is -Infinity")])
def test_a_number_that_is_not_finite_is_refused_anywhere_in_the_deepspeed_config(override, shown):
    with pytest.raises(ConfigError, match=re.escape(f"with --ds: DeepSpeed setting {shown}: expected a finite number")):
        load_ds_config("zero3_bf16", [override])


def test_each_schema_section_is_a_pydantic_model_of_the_installed_deepspeed_and_a_known_key():
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    from pipeline.run.ds_schema import SECTION_MODELS, section_model
    for section in SECTION_MODELS:
        assert section in KNOWN_KEYS and issubclass(section_model(section), DeepSpeedConfigModel), section
        assert section_model(section).model_config.get("extra") == "forbid", section  # DeepSpeed refuses extras too
