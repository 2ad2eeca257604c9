"""Pretraining's engine modes, by (mode, objective): the run loop and the held-out evaluation get a Stepper
(pipeline/run/stepper.py) and never ask which mode runs.

  zero3, mlm      Zero3Stepper (zero3.py): the plain model under a DeepSpeedEngine, any ZeRO stage
  pipeline, mlm   PipeStepper (pipe.py): the same blocks as a PipelineModule with ZeRO-0/1
  zero3, rtd      RTDStepper (rtd.py): DeBERTa-v3's generator and discriminator under one engine
"""
from pipeline.train.pipe import PipeStepper
from pipeline.train.rtd import RTDStepper
from pipeline.train.zero3 import Zero3Stepper

STEPPERS = {("zero3", "mlm"): Zero3Stepper, ("pipeline", "mlm"): PipeStepper, ("zero3", "rtd"): RTDStepper}


def stepper_class(run):
    """The stepper of a run's mode and objective (RunConfig.validate refuses rtd in pipeline mode)."""
    return STEPPERS[(run.mode, run.objective)]


def build_stepper(run, ds, model_config, rank):
    return stepper_class(run)(run, ds, model_config, rank)
