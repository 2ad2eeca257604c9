"""The engine modes of pretraining, by name: `pretrain` and the held-out evaluation get a Stepper (stepper.py) and
never ask which mode runs.

  zero3     Zero3Stepper (zero3.py): the plain model under a DeepSpeedEngine, any ZeRO stage
  pipeline  PipelineStepper (pipeline_parallel.py): the same blocks as a PipelineModule with ZeRO-0/1
"""
from pipeline.train.pipeline_parallel import PipelineStepper
from pipeline.train.zero3 import Zero3Stepper

STEPPERS = {"zero3": Zero3Stepper, "pipeline": PipelineStepper}


def stepper_class(mode):
    return STEPPERS[mode]


def build_stepper(run, ds, model_config, rank):
    return stepper_class(run.mode)(run, ds, model_config, rank)
