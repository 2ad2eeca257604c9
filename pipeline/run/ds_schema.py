"""The sections of a DeepSpeed config checked against the running DeepSpeed's own schema, before anything
starts: every nested key (`zero_optimization.stgae`, `fp16.enabledd`, `zero_optimization.offload_param.devic`)
and every value DeepSpeed's config classes would refuse. Without this DeepSpeed refuses them itself inside
`deepspeed.initialize`, with a pydantic traceback, after the run directory exists.

DeepSpeed builds most sections as pydantic models (DeepSpeedConfigModel, `extra="forbid"`): the accepted names
are a model's `model_fields` and their aliases (`stage3_prefetch_bucket_size` for `prefetch_bucket_size`), and a
field whose type is a model is a nested section. SECTION_MODELS names the model of each section; sections that
DeepSpeed reads from a plain dict (activation_checkpointing, flops_profiler, checkpoint, pipeline, aio, ...)
give no schema and are checked at the top level only (pipeline/run/ds_config.py KNOWN_KEYS).
"""
import contextlib
import importlib
import typing

from pipeline.errors import ConfigError
from pipeline.settings import closest

# top-level section -> (module, class) of the model DeepSpeed 0.19.8 builds it with (deepspeed/runtime/config.py
# DeepSpeedConfig.__init__ and the get_*_config functions it calls). tests/unit/test_ds_config.py checks that each
# is a pydantic model of the installed DeepSpeed.
SECTION_MODELS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "bfloat16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "tensorboard": ("deepspeed.monitor.config", "TensorBoardConfig"),
    "wandb": ("deepspeed.monitor.config", "WandbConfig"),
    "csv_monitor": ("deepspeed.monitor.config", "CSVConfig"),
    "comet": ("deepspeed.monitor.config", "CometConfig"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
    "hybrid_engine": ("deepspeed.runtime.config", "HybridEngineConfig"),
    "compile": ("deepspeed.compile.config", "CompileConfig"),
    "tensor_parallel": ("deepspeed.runtime.tensor_parallel.config", "TPTrainingConfig"),
    "weight_quantization": ("deepspeed.inference.config", "WeightQuantConfig"),
}


def section_model(section):
    module, name = SECTION_MODELS[section]
    return getattr(importlib.import_module(module), name)


def check_sections(ds, source):
    """Refuse, naming `source`, the dotted path and the closest accepted name, a key that DeepSpeed's model of
    its section does not accept; then a value the model refuses (wrong type, out of range)."""
    for section in SECTION_MODELS:
        if isinstance(ds.get(section), dict):
            model = section_model(section)
            check_keys(ds[section], model, section, source)
            check_values(ds[section], model, section, source)


def accepted_names(model):
    """{name a config may use: field name}: each field by its name and its alias (DeepSpeed's models set
    populate_by_name, so both are accepted)."""
    names = {}
    for field_name, field in model.model_fields.items():
        names[field_name] = field_name
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                names[alias] = field_name
    return names


def suggestions(model):
    """The names worth suggesting: not the deprecated ones (DeepSpeed warns about those)."""
    return [name for name, field_name in accepted_names(model).items()
            if not (model.model_fields[field_name].json_schema_extra or {}).get("deprecated")]


def nested_model(annotation):
    """The model class inside a field's type (X, Optional[X], Union[X, ...]), or None."""
    from pydantic import BaseModel
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [m for m in map(nested_model, typing.get_args(annotation)) if m is not None]
    return models[0] if len(models) == 1 else None


def check_keys(values, model, path, source):
    names = accepted_names(model)
    given = {}  # field name -> the key that gave it
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown DeepSpeed setting '{path}.{key}'{closest(key, suggestions(model))}; "
                              f"DeepSpeed {_version()} would refuse it when the run starts")
        if names[key] in given:
            raise ConfigError(f"{source}: DeepSpeed setting '{path}.{key}' is given twice, also as "
                              f"'{path}.{given[names[key]]}' (one is the other's alias): keep one")
        given[names[key]] = key
        inner = nested_model(model.model_fields[names[key]].annotation)
        if inner is not None and isinstance(value, dict):
            check_keys(value, inner, f"{path}.{key}", source)


def check_values(values, model, path, source):
    """Build the section as DeepSpeed will (its own validators run), a refusal as one line naming the setting."""
    from pydantic import ValidationError
    try:
        with _quiet_deepspeed():  # deprecated names: DeepSpeed warns again when the run starts
            model(**values)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join([path] + [str(part) for part in first["loc"]])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: DeepSpeed setting '{where}': {message} (got {first.get('input')!r})") from None
    except (ValueError, TypeError, AssertionError) as error:  # a model's own check outside pydantic's
        raise ConfigError(f"{source}: DeepSpeed setting '{path}': {error}") from None


@contextlib.contextmanager
def _quiet_deepspeed():
    from deepspeed.utils import logger
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _version():
    import deepspeed
    return deepspeed.__version__
