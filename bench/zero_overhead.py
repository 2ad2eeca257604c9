"""What DeepSpeed's engine costs per training step, by ZeRO stage, on one rank.

ZeRO-3 gathers and releases parameters from hooks on the model's modules, and those hooks run in Python
on the host for every module, in forward, in the recomputation of activation checkpointing and in
backward. That work grows with the number of modules, not with their width: on a fast GPU it can take
longer than the kernels it launches. This benchmark measures the whole step of each variant:

  bare     our model and torch's AdamW without DeepSpeed, in the run's dtype (no fp32 master copy): a floor
  z1, z2   DeepSpeedEngine with ZeRO-1, ZeRO-2
  z3       ZeRO-3 with hooks on every module (zero3_leaf_layers=false)
  z3_leaf  ZeRO-3 with the encoder layers gathered whole, as DeepSpeed leaf modules (the default;
           pipeline/train/zero3.py, leaf_layers)

Engines are built by pipeline.train.modes.build_stepper (a Zero3Stepper, pipeline/train/zero3.py) and
stepped by its train_step, as `deberta-ds pretrain` does, from the settings of configs/pretrain_xxlarge.json
(EMD) with activation checkpointing (--no-checkpointing: without; the recipe now runs without it) and the ZeRO settings of --deepspeed (default: the shipped zero3_bf16,
ds_configs/zero3_bf16.json); only the stage and the leaf setting change between variants. Each variant
runs in a process of its own (world size 1), so none inherits another's allocations or hooks.

Default shape (the CPU): the 1.5B preset's depth, 48 layers, at hidden size 64, batch 2 x 64 tokens, so
that compute is small and the step is mostly fixed work. --hidden 0 keeps the preset's width: the real
1.5B model, for a GPU (--device cuda --dtype bf16 --batch 8 --seq 512).
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

from pipeline.cli import Parser
from pipeline.cli_types import at_least, names_from, positive_int
from tests.helpers.launch import ROOT, run_env, single_rank

VARIANTS = ("bare", "z1", "z2", "z3", "z3_leaf")
STAGE = {"z1": 1, "z2": 2, "z3": 3, "z3_leaf": 3}


def parse_args(argv=None):
    p = Parser(prog="python -m bench.zero_overhead", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--layers", type=positive_int, default=48, help="encoder layers (default 48, the 1.5B preset's)")
    p.add_argument("--hidden", type=at_least(0), default=64,
                   help="hidden size, heads of 64 (default 64); 0: the preset's (1536: the 1.5B model)")
    p.add_argument("--batch", type=positive_int, default=2, help="micro-batch (default 2)")
    p.add_argument("--seq", type=at_least(8), default=64, help="tokens per sequence (default 64)")
    p.add_argument("--no-checkpointing", action="store_true", help="without activation checkpointing")
    p.add_argument("--deepspeed", default="zero3_bf16",
                   help="DeepSpeed config whose ZeRO settings the variants share: a path or a shipped name "
                        "(default zero3_bf16: ds_configs/zero3_bf16.json)")
    p.add_argument("--ds", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DeepSpeed-config setting for all variants, as `deberta-ds pretrain --ds`")
    p.add_argument("--variants", type=names_from(VARIANTS), default=list(VARIANTS),
                   help=f"comma-separated, from {','.join(VARIANTS)} (default all)")
    p.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps per variant (default 2)")
    p.add_argument("--steps", type=positive_int, default=6, help="timed steps per variant; the median is reported")
    p.add_argument("--profile", action="store_true",
                   help="then 3 more steps under cProfile: Python function calls and ZeRO-3 parameter fetches per step")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return args


def run_config(args, variant):
    from pipeline.train.config import RunConfig
    # no dropout: every variant computes the same loss in its first step (before any update: bare does not
    # clip gradients), a check that they all run the same model on the same batch
    overrides = {"num_hidden_layers": args.layers, "vocab_size": 1000 if args.hidden else 128100,
                 "max_position_embeddings": max(512, args.seq), "hidden_dropout_prob": 0.0,
                 "attention_probs_dropout_prob": 0.0}
    if args.hidden:
        overrides.update(hidden_size=args.hidden, num_attention_heads=max(1, args.hidden // 64),
                         intermediate_size=4 * args.hidden)
    return RunConfig(model="xxlarge", model_overrides=overrides, emd=True,
                     activation_checkpointing=not args.no_checkpointing, zero3_leaf_layers=variant == "z3_leaf",
                     global_batch_size=args.batch, micro_batch_size=args.batch, warmup_steps=0, max_steps=10 ** 6)


def ds_config(args, run, variant):
    from pipeline.run.ds_config import load_ds_config
    from pipeline.train.preflight import complete_for_run
    ds, path = load_ds_config(args.deepspeed, args.ds)
    ds["bf16"] = {"enabled": args.dtype == "bf16"}
    ds["zero_optimization"]["stage"] = STAGE[variant]
    return complete_for_run(run, ds, 1, source=path)


def batch_of(config, args, device):
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (args.batch, args.seq), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def bare_step(args, run, device):
    import torch
    from model import DebertaForMaskedLM
    from model.fast import convert
    from pipeline.run.optim import build_optimizer
    from pipeline.train.zero3 import torch_checkpoint
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = DebertaForMaskedLM(run.model_config(), emd=run.emd).to(dtype)
    convert.apply(model, run.model_config().attention_impl)  # as the trainers: one rank, whole weights
    if run.activation_checkpointing:
        model.deberta.encoder.checkpoint_fn = torch_checkpoint
    optimizer = build_optimizer(model, run.lr, run.adam_betas, run.adam_eps, run.weight_decay, run.optimizer)
    batch = batch_of(model.config, args, device)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step, model


def engine_step(args, run, variant, device):
    import torch
    from pipeline.train.modes import build_stepper
    torch.manual_seed(0)
    stepper = build_stepper(run, ds_config(args, run, variant), run.model_config(), 0)
    # one optimizer step = gradient_accumulation_steps micro-batches (1 here: micro-batch = global batch)
    stepper.feed(itertools.repeat(batch_of(stepper.module.config, args, stepper.device)))
    # the loss read on the host each step, as bare_step's loss.item()
    return (lambda: float(stepper.train_step()["loss"])), stepper.module


def child(args):
    """One variant in this process: prints one JSON line."""
    import torch
    import deepspeed
    import torch._dynamo  # noqa: F401  (before zero.Init patches module construction)
    from deepspeed.utils import get_z3_leaf_modules
    if args.device == "cuda":
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo", auto_mpi_discovery=False)
    variant = args.child
    run = run_config(args, variant)
    step, module = (bare_step(args, run, args.device) if variant == "bare"
                    else engine_step(args, run, variant, args.device))
    losses = [step() for _ in range(args.warmup)]
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {"variant": variant, "step_ms": round(seconds * 1e3, 1),
              "tokens_per_s": round(args.batch * args.seq / seconds, 1),
              "leaf_layers": len(get_z3_leaf_modules(module)), "first_loss": losses[0]}
    if args.profile:
        result.update(profile_counts(step))
    print(json.dumps(result), flush=True)


def profile_counts(step, steps=3):
    """Python function calls per step, and calls of ZeRO-3's parameter fetch (one per module, or per leaf,
    whose parameters a hook gathers)."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    fetches = sum(calls for (_, _, name), (_, calls, *_) in stats.stats.items() if name == "_fetch_sub_module_impl")
    return {"python_calls_per_step": stats.total_calls // steps, "fetches_per_step": fetches // steps}


def deepspeed_source(name_or_path):
    """The DeepSpeed config file --deepspeed names (a path, or a shipped name), relative to the root."""
    from pipeline.settings import config_file
    return os.path.relpath(config_file(name_or_path, "deepspeed"), ROOT)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    forwarded = list(argv if argv is not None else sys.argv[1:])
    print(f"# {args.layers} layers, hidden {args.hidden or 'of the preset'}, batch {args.batch} x {args.seq}, "
          f"{args.dtype} on {args.device}, activation checkpointing {'off' if args.no_checkpointing else 'on'}, "
          f"ZeRO settings from {deepspeed_source(args.deepspeed)} {' '.join(args.ds)}", flush=True)
    results = {}
    for variant in args.variants:
        # one rank without a launcher; OMP_NUM_THREADS as the caller has it
        env = run_env(single_rank(), cpu=args.device == "cpu", threads=None)
        done = subprocess.run([sys.executable, "-m", "bench.zero_overhead", *forwarded, "--child", variant],
                              env=env, capture_output=True, text=True)  # PYTHONPATH: the root, from anywhere
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"{variant}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[variant] = json.loads(lines[-1])
    floor = results.get("bare", {}).get("step_ms")
    print(f"{'variant':8} {'ms/step':>9} {'tokens/s':>10} {'over bare':>10} {'leaf layers':>12} {'first loss':>11}"
          + (f" {'calls/step':>11} {'fetches/step':>13}" if args.profile else ""))
    for variant, r in results.items():
        over = f"{r['step_ms'] - floor:+.1f}" if floor else ""
        print(f"{variant:8} {r['step_ms']:9.1f} {r['tokens_per_s']:10.1f} {over:>10} {r['leaf_layers']:12d} "
              f"{r['first_loss']:11.6f}"
              + (f" {r['python_calls_per_step']:11d} {r['fetches_per_step']:13d}" if args.profile else ""))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
