"""`deberta-ds pretrain --deepspeed auto`: the planner's choice (pipeline/train/plan.py: the lowest ZeRO stage
that fits, then no recomputation, then the largest micro-batch up to the run's) for this job's ranks and
devices, as a DeepSpeed config plus the run-config settings it implies (micro_batch_size,
activation_checkpointing). Rank 0 prints one line saying what was chosen and why.

The device is DeepSpeed's accelerator: a GPU plans with its own memory and trains in bf16 where it has it
(compute capability 8 and up), else fp16 with dynamic loss scaling; on the CPU the ranks of a node share its
memory and train in fp32 (DeepSpeed on the CPU: ZeRO-1/2/3 and pipeline ZeRO-1 run with gloo). Every rank
plans from its own device; `check_same_choice` refuses a job whose ranks chose differently (mixed devices)
before any engine starts, instead of letting them wait in mismatched collectives.

The ZeRO settings follow the rules of the shipped configs: ZeRO-3 those of ds_configs/zero3_bf16.json derived
from the hidden size h (reduce bucket h², parameter persistence 10·h, a prefetch bucket of one encoder layer);
ZeRO-1/2 2e8-element buckets (ds_configs/zero1_bf16.json, the 1.5B recipe, is this module's output for 8 nodes
of 8 80 GB GPUs; tests/unit/test_plan.py checks that).
"""
import dataclasses
import math
import os

from pipeline.run.ds_config import check_ds_config
from pipeline.errors import ConfigError
from pipeline.settings import apply_overrides
from pipeline.train import plan

GB = plan.GB
ZERO12_BUCKET = 200_000_000  # elements; 0.4 GB in bf16, inside the plan's 10% headroom on 40 GB and larger GPUs


@dataclasses.dataclass
class Device:
    kind: str  # DeepSpeed's accelerator name: "cuda", "cpu", ...
    name: str  # what the line prints: "NVIDIA H100 80GB HBM3", "CPU"
    memory_gb: float  # what one rank may use
    precision: str  # "bf16", "fp16" or "fp32"


def local_device(ranks_per_node, local_rank=0):
    """This rank's device as DeepSpeed will use it (DS_ACCELERATOR decides, as it does for the engine)."""
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    kind = accelerator.device_name()
    if kind == "cpu":  # the ranks of a node share its memory
        return Device("cpu", "CPU", accelerator.total_memory() / GB / max(ranks_per_node, 1), "fp32")
    if kind == "cuda":
        import torch
        # the properties only: no tensor, so no CUDA context on another rank's GPU
        props = torch.cuda.get_device_properties(local_rank % max(torch.cuda.device_count(), 1))
        return Device(kind, props.name, props.total_memory / GB, "bf16" if props.major >= 8 else "fp16")
    index = local_rank % max(accelerator.device_count(), 1)
    return Device(kind, kind, accelerator.total_memory(index) / GB,
                  "bf16" if accelerator.is_bf16_supported() else "fp16")


def layer_parameters(model_config):
    """Parameters of one encoder layer (ZeRO-3 gathers a layer as one group: the prefetch bucket holds one)."""
    import torch
    from model.encoder import Layer
    with torch.device("meta"):
        return sum(p.numel() for p in Layer(model_config).parameters())


def round_up(n):
    """Up to one significant digit: 28,331,520 -> 30,000,000."""
    scale = 10 ** int(math.log10(max(n, 1)))
    return math.ceil(n / scale) * scale


def zero_section(row, model_config, on_gpu):
    stage, h = row["zero_stage"], model_config.hidden_size
    if stage == 3:
        return {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": h * h,
                "stage3_prefetch_bucket_size": round_up(layer_parameters(model_config)),
                "stage3_param_persistence_threshold": 10 * h,
                "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
                "stage3_gather_16bit_weights_on_model_save": True}
    if row["mode"] == "pipeline":  # as ds_configs/pipeline_zero1_bf16.json
        return {"stage": 1, "reduce_bucket_size": h * h}
    zero = {"stage": stage, "overlap_comm": on_gpu, "reduce_bucket_size": ZERO12_BUCKET,
            "allgather_bucket_size": ZERO12_BUCKET}
    if stage == 2:
        zero.update(contiguous_gradients=True, reduce_scatter=True)
    return zero


def ds_config_for(row, model_config, device):
    """The DeepSpeed config of a chosen plan row on `device` (batch sizes come later, from the run config)."""
    ds = {"gradient_clipping": 1.0}  # the paper's clipping, as in every shipped pretraining config
    if device.precision != "fp32":
        ds[device.precision] = {"enabled": True}
    ds["zero_optimization"] = zero_section(row, model_config, device.kind != "cpu")
    ds.update(steps_per_print=1_000_000, wall_clock_breakdown=False)
    return ds


def seq_len_of(run):
    from pipeline.data.shards import ShardSet
    return ShardSet(run.data_dir).max_seq_len


def resumable_stages(run):
    """The ZeRO stages this run can resume under: all without a checkpoint in its output directory; after one
    written under ZeRO-3 (per-rank `zero_pp_rank_*_model_states.pt`) only 3; after ZeRO-1/2 (one
    `mp_rank_*_model_states.pt`) 1 or 2, which partition the optimizer alike. DeepSpeed cannot load a checkpoint
    of the other kind: another cluster shape must not turn a requeued run into a failed load."""
    from pipeline.run.checkpointer import newest_complete
    ckpt_dir = os.path.join(run.output_dir, "checkpoints")
    tag = newest_complete(ckpt_dir)[0] if os.path.isdir(ckpt_dir) else None
    if tag is None:
        return plan.ZERO_STAGES, None
    zero3 = any(name.startswith("zero_pp_rank_") and name.endswith("_model_states.pt")
                for name in os.listdir(os.path.join(ckpt_dir, tag)))
    return ((3,) if zero3 else (1, 2)), tag


def choose_for_job(run, world_size, ranks_per_node, device, seq_len, zero_stages=plan.ZERO_STAGES):
    """The plan of this job and its choice (a plan row), or a ConfigError saying why nothing fits."""
    if run.optimizer == "cpu_adam":
        raise ConfigError("--deepspeed auto plans without offload, and optimizer 'cpu_adam' needs an offloading "
                          "config: give --deepspeed zero3_offload_bf16, or --set optimizer=adamw")
    per_node = ranks_per_node if world_size % ranks_per_node == 0 else world_size
    result = plan.plan(run, world_size // per_node, per_node, device.memory_gb, seq_len, run.pipeline_stages,
                       zero_stages, element_bytes=4 if device.precision == "fp32" else 2,
                       sequence_parallel=run.sequence_parallel_size)
    if result["choice"] is None:
        raise ConfigError(f"--deepspeed auto: {plan.nothing_fits(result)}")
    return result, result["choice"]


def resolve(run, overrides, world_size, ranks_per_node=1, local_rank=0, announce=True, device=None, seq_len=None):
    """(run config with the chosen micro-batch and recomputation, DeepSpeed config, source name). device and
    seq_len: this rank's device and the shards' sequence length unless given."""
    if any(item.split("=", 1)[0].strip() == "zero_optimization.stage" for item in overrides):
        raise ConfigError("--ds zero_optimization.stage with --deepspeed auto: the planner chooses the stage; give a "
                          "DeepSpeed config instead (e.g. --deepspeed zero3_bf16) to choose it yourself")
    device = device or local_device(ranks_per_node, local_rank)
    stages, tag = resumable_stages(run)
    result, row = choose_for_job(run, world_size, ranks_per_node, device, seq_len or seq_len_of(run), stages)
    ds = ds_config_for(row, run.model_config(), device)
    source = "--deepspeed auto" + (" with --ds" if overrides else "")
    ds = check_ds_config(apply_overrides(ds, overrides, option="--ds"), "--deepspeed auto", source)
    chosen = dataclasses.replace(run, micro_batch_size=row["micro_batch"],
                                 activation_checkpointing=row["activation_checkpointing"])
    if announce:
        print(f"deepspeed auto: {plan.describe(row)}, {device.precision} on {world_size} x {device.name} "
              f"({row['total_gb']:.3g} of {device.memory_gb:.3g} GiB per rank, seq {result['seq_len']}): "
              f"{plan.RULE} {run.micro_batch_size}"
              + (f", among ZeRO-{'/'.join(map(str, stages))}, which can load checkpoint {tag}" if tag else "")
              + " (`deberta-ds plan` shows the table)", flush=True)
    return chosen, ds, source


def check_same_choice(run, ds, local_rank):
    """After the process group is up: every rank chose the same (ZeRO stage, precision, micro-batch,
    recomputation), or every rank raises a ConfigError saying so (all see the same extremes)."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from pipeline.run.ds_config import precision, zero_stage
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":  # as the engine will; a collective needs each rank on its own device
        accelerator.set_device(local_rank % max(accelerator.device_count(), 1))
    mine = [zero_stage(ds), ("fp32", "fp16", "bf16").index(precision(ds)), run.micro_batch_size,
            int(run.activation_checkpointing)]
    extremes = torch.tensor(mine + [-v for v in mine], dtype=torch.int64, device=accelerator.current_device_name())
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    highest, lowest = extremes[:4].tolist(), [-v for v in extremes[4:].tolist()]
    if highest != lowest:
        raise ConfigError(f"--deepspeed auto chose differently on different ranks ([ZeRO stage, precision, micro-batch, "
                          f"recomputation] from {lowest} to {highest}): their devices differ. Give a DeepSpeed config "
                          "and the run-config settings explicitly (deberta-ds plan helps)")
