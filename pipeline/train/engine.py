"""The engine modes of pretraining, by name: `pretrain` and the held-out evaluation get a Stepper (stepper.py) and
never ask which mode runs.

  zero3     Zero3Stepper (zero3.py): the plain model under a DeepSpeedEngine, any ZeRO stage
  pipeline  PipelineStepper (pipeline_parallel.py): the same blocks as a PipelineModule with ZeRO-0/1
  rtd       RTDStepper (rtd.py): objective rtd (DeBERTa-v3's generator and discriminator) in mode zero3
"""
from pipeline.train.pipeline_parallel import PipelineStepper
from pipeline.train.rtd import RTDStepper
from pipeline.train.zero3 import Zero3Stepper

STEPPERS = {("zero3", "mlm"): Zero3Stepper, ("pipeline", "mlm"): PipelineStepper, ("zero3", "rtd"): RTDStepper}


def stepper_class(run):
    """The stepper of a run's mode and objective (RunConfig.validate refuses rtd in pipeline mode)."""
    return STEPPERS[(run.mode, run.objective)]


def build_stepper(run, ds, model_config, rank):
    return stepper_class(run)(run, ds, model_config, rank)
