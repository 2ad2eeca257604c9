"""Pretraining's engine modes, by (mode, objective, training kind): the run loop and the held-out evaluation get a
Stepper (pipeline/run/stepper.py) and never ask which mode runs.

  zero3, mlm              Zero3Stepper (zero3.py): the plain model under a DeepSpeedEngine, any ZeRO stage
  pipeline, mlm           PipeStepper (pipe.py): the same blocks as a PipelineModule with ZeRO-0/1
  zero3, rtd, decoupled   DecoupledRTDStepper (rtd_decoupled.py): DeBERTa-v3's generator and discriminator, each
                          under its own engine, stepping one after the other (the official default)
  zero3, rtd, joint       RTDStepper (rtd.py): the two under one engine, one step on the summed loss
"""
from pipeline.train.pipe import PipeStepper
from pipeline.train.rtd import RTDStepper
from pipeline.train.rtd_decoupled import DecoupledRTDStepper
from pipeline.train.zero3 import Zero3Stepper

STEPPERS = {("zero3", "mlm", None): Zero3Stepper, ("pipeline", "mlm", None): PipeStepper,
            ("zero3", "rtd", "decoupled"): DecoupledRTDStepper, ("zero3", "rtd", "joint"): RTDStepper}


def stepper_class(run):
    """The stepper of a run's mode, objective and (rtd) training kind (RunConfig.validate refuses rtd in pipeline
    mode)."""
    return STEPPERS[(run.mode, run.objective, run.rtd_training if run.objective == "rtd" else None)]


def build_stepper(run, ds, model_config, rank):
    return stepper_class(run)(run, ds, model_config, rank)
