"""The whole pretraining loop against the bare model step, per engine mode, on the CPU.

    python -m bench.loop [--modes zero1,zero2,zero3,pipeline,rtd] [--rounds 1] [--json FILE] [--quick]

For the same model, shape, precision (fp32), micro-batch and recomputation, each mode times two things:

  bare  forward, backward and torch's AdamW (the trainer's parameter groups) of the model built as the trainer
        builds it (the plain model, then model.fast.convert.apply with the mode's choices, recomputation as
        the run's), on the same batches from the real loader and masking, without DeepSpeed, in processes of
        one thread. The batches are drawn before the clock starts: the loader's time is part of the loop's.
  loop  `deberta-ds pretrain` under torchrun (2 CPU ranks, gloo, one thread each) through the real CLI, loader,
        masking and monitor, logging every step, no validation, no checkpoint before the last step: the median
        `step_time_s` of metrics.jsonl after --warmup steps.

Modes (ds_configs/cpu_zero3_fp32.json with --ds zero_optimization.stage=N, or cpu_pipeline_fp32.json):
  zero1, zero2, zero3   mode zero3 at ZeRO stage 1, 2 and 3 (leaf layers, the default), 2 data-parallel ranks
                        of --micro-batch; bare: 2 processes at once, each one rank's micro-batches
  pipeline              2 ranks as 2 stages (ZeRO-1), a global batch of --pipe-micro-batches micro-batches;
                        bare: the same global batch on 2 bare data-parallel processes, each the whole model over
                        half the micro-batches (gradient accumulation): the floor of 2 cores without a pipe,
                        so the ratio includes the pipe's bubble, (M + 1) / M for M micro-batches on 2 stages
  rtd                   objective rtd (generator of half the depth, gdes, rtd_training joint: one engine over
                        both networks, the computation of the bare step) at ZeRO stage --rtd-stage;
                        bare: model.rtd.RTDModel with the same conversion
The bare step of a data-parallel pair is, per step, the slower of its two processes (a synchronous step lasts as
long as its slowest rank), then the median over the steps. Modes run in turn, each bare then loop (the loop
first in even rounds); --rounds N repeats the whole sequence and reports the median of the rounds, so that other
load on the machine hits both sides alike.

Default shape: the base preset with 6 layers (hidden 768, 12 heads, FFN 3072), sequences of 512, micro-batch 2,
the demo corpus's 1000-piece tokenizer (vocabulary 1100), dropout as the preset's. --quick: 2 layers of width
64, sequences of 128, a check that every mode runs (about a minute or two), not a measurement. The shards are
built once in --work (or given with --data-dir); the run directories are removed after they are read.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from bench.runs import demo_shards
from pipeline.cli import Parser
from pipeline.cli_types import at_least, names_from, positive_int
from pipeline.io import atomic_json
from tests.helpers.launch import PIPE, TINY_RUN, ZERO3, explain, metrics, pretrain, run_env

MODES = ("zero1", "zero2", "zero3", "pipeline", "rtd")
RANKS = 2


def parse_args(argv=None):
    p = Parser(prog="python -m bench.loop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", type=names_from(MODES), default=list(MODES),
                   help=f"comma-separated, from {','.join(MODES)} (default all)")
    p.add_argument("--layers", type=at_least(2), default=6, help="encoder layers (default 6)")
    p.add_argument("--hidden", type=at_least(64), default=768, help="hidden size, heads of 64 (default 768)")
    p.add_argument("--seq", type=at_least(16), default=512, help="tokens per sequence (default 512)")
    p.add_argument("--micro-batch", type=positive_int, default=2, help="sequences per micro-batch (default 2)")
    p.add_argument("--pipe-micro-batches", type=at_least(2), default=4,
                   help="pipeline: micro-batches per global step, even (default 4)")
    p.add_argument("--rtd-stage", type=int, choices=[1, 2, 3], default=2, help="rtd: the ZeRO stage (default 2)")
    p.add_argument("--checkpointing", action="store_true", help="recompute activations (both sides)")
    p.add_argument("--warmup", type=positive_int, default=2, help="untimed steps on both sides (default 2)")
    p.add_argument("--steps", type=positive_int, default=4, help="timed steps on both sides (default 4)")
    p.add_argument("--rounds", type=positive_int, default=1, help="repeats of the whole sequence (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (2 layers, hidden 64, seq 128, 1 + 2 steps): checks that it works")
    p.add_argument("--default-malloc", action="store_true",
                   help="glibc's allocator defaults on both sides (default: the steady state, as bench.train_step)")
    p.add_argument("--work", default="/tmp/bench-loop", help="work directory: shards, run directories")
    p.add_argument("--data-dir", default=None, help="existing shards of --seq tokens (default: built in --work)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the table and the setup as JSON")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # MODE:RANK, one bare process
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.seq, args.warmup, args.steps = 2, 64, 128, 1, 2
        args.pipe_micro_batches = 2
    if args.pipe_micro_batches % RANKS:
        p.error(f"--pipe-micro-batches must be a multiple of {RANKS}, got {args.pipe_micro_batches}")
    return args


# ------------------------------------------------------------------ the runs' settings, shared by both sides
def run_sets(args, mode, data_dir):
    """The `--set` items of configs/pretrain_tiny_cpu.json for this mode: the bare processes read the same
    RunConfig as the loop."""
    overrides = {"num_hidden_layers": args.layers, "hidden_size": args.hidden,
                 "num_attention_heads": args.hidden // 64, "intermediate_size": 4 * args.hidden,
                 "vocab_size": 1100, "max_position_embeddings": args.seq,
                 "position_buckets": min(256, args.seq // 2)}  # the preset's 256 at seq 512
    micro_batches = args.pipe_micro_batches if mode == "pipeline" else RANKS  # per global step, all ranks
    sets = ["model=base", f"model_overrides={json.dumps(overrides)}", f"micro_batch_size={args.micro_batch}",
            f"global_batch_size={args.micro_batch * micro_batches}", f"max_steps={args.warmup + args.steps}",
            "warmup_steps=1", "lr=1e-4", "log_interval=1", "save_interval=1000000",
            f"activation_checkpointing={json.dumps(args.checkpointing)}", f"data_dir={json.dumps(data_dir)}"]
    if mode == "pipeline":
        sets += ["mode=pipeline", f"pipeline_stages={RANKS}"]
    if mode == "rtd":
        sets += ["objective=rtd", "rtd_training=joint"]  # one engine: the bare step below is that computation
    return sets


def zero_stage_of(args, mode):
    return {"zero1": 1, "zero2": 2, "zero3": 3, "pipeline": 1, "rtd": args.rtd_stage}[mode]


def ds_of(args, mode):
    """(DeepSpeed config path, its --ds items)."""
    if mode == "pipeline":
        return PIPE, []
    return ZERO3, [f"zero_optimization.stage={zero_stage_of(args, mode)}"]


# ------------------------------------------------------------------ the bare side (one process per rank)
def bare_model(run, stage):
    """The trainer's model without DeepSpeed (pipeline/train/zero3.py build_zero3_model, rtd.py build_rtd_model,
    pipe.py: the whole model where the pipe has its blocks) and the optimizer's parameter groups."""
    from model.fast import convert
    from model.heads import DebertaForMaskedLM
    from model.rtd import RTDModel
    from pipeline.run.optim import param_groups
    from pipeline.train.zero3 import torch_checkpoint
    config = run.model_config()
    if run.objective == "rtd":
        model = RTDModel(config, run.generator_config(), run.embedding_sharing, run.rtd_lambda, emd=run.emd)
        encoders = [model.generator.deberta.encoder, model.discriminator.deberta.encoder]
        d_lr = run.lr if run.discriminator_lr is None else run.discriminator_lr
        groups = (param_groups(model.generator, run.weight_decay, run.lr)
                  + param_groups(model.discriminator, run.weight_decay, d_lr))
    else:
        model = DebertaForMaskedLM(config, emd=run.emd)
        encoders, groups = [model.deberta.encoder], None
    convert.apply(model, config.attention_impl, fuse_qkv=stage != 3, autocast_linear=stage != 3)
    if run.activation_checkpointing:
        for encoder in encoders:
            encoder.checkpoint_fn = torch_checkpoint
    return model, groups


def malloc_env(args):
    """The allocator's settings of both sides: glibc told to keep what it frees (bench/train_step.py), unless
    --default-malloc. With glibc's defaults each step pays page faults for fresh activations and gradients
    again, how many depending on what the process ran before: two processes of the same step differ."""
    from bench.train_step import STEADY_MALLOC
    return {} if args.default_malloc else dict(STEADY_MALLOC)


def bare_child(args, mode, rank):
    """One bare data-parallel process: prints {"times": [...], "first_loss": ..., "loader_s": ..., "cpu_s": ...,
    "minor_faults": ...} (the last two per timed step: CPU time and page faults of this process)."""
    import resource
    import torch
    from pipeline.data.mlm_loader import build_pretrain_loader
    from pipeline.run.lifecycle import seed_for_build, seed_for_steps
    from pipeline.run.optim import build_optimizer
    from pipeline.train.config import RunConfig
    run = RunConfig.from_file(TINY_RUN, run_sets(args, mode, args.data_dir))
    seed_for_build(run.seed)
    model, groups = bare_model(run, zero_stage_of(args, mode))
    optimizer = build_optimizer(model, run.lr, run.adam_betas, run.adam_eps, run.weight_decay, run.optimizer,
                                groups=groups)
    seed_for_steps(run.seed, rank)
    accumulation = run.global_batch_size // (run.micro_batch_size * RANKS)
    loader = iter(build_pretrain_loader(run.data_dir, run.tokenizer_path(), run.micro_batch_size, rank, RANKS,
                                        run.seed, masking=run.objective))
    start = time.perf_counter()
    batches = [[next(loader) for _ in range(accumulation)] for _ in range(args.warmup + args.steps)]
    loader_s = (time.perf_counter() - start) / len(batches)

    def step(micro_batches):
        losses = []
        for batch in micro_batches:
            loss = model(**batch).loss
            (loss / accumulation).backward()
            losses.append(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean().item()

    times, first_loss = [], step(batches[0])
    for micro_batches in batches[1:args.warmup]:
        step(micro_batches)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for micro_batches in batches[args.warmup:]:
        start = time.perf_counter()
        step(micro_batches)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime) / len(times)
    print(json.dumps({"times": times, "first_loss": first_loss, "loader_s": loader_s, "cpu_s": cpu_s,
                      "minor_faults": (after.ru_minflt - usage.ru_minflt) / len(times)}), flush=True)


def bare(args, mode, data_dir):
    """The bare step of `mode`: RANKS processes at once; per step the slowest, then the median over steps."""
    env = run_env(malloc_env(args))  # one thread per process, as each loop rank
    children = [subprocess.Popen([sys.executable, "-m", "bench.loop", *bare_argv(args, data_dir),
                                  "--child", f"{mode}:{rank}"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for rank in range(RANKS)]
    results = []
    for rank, child in enumerate(children):
        out, err = child.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if child.returncode != 0 or not lines:
            sys.exit(f"error: bare {mode} rank {rank} failed (exit {child.returncode}):\n{err[-4000:]}")
        results.append(json.loads(lines[-1]))
    per_step = [max(times) for times in zip(*(r["times"] for r in results))]
    return {"step_s": statistics.median(per_step), "first_loss": statistics.mean(r["first_loss"] for r in results),
            "loader_s": max(r["loader_s"] for r in results), "cpu_s": max(r["cpu_s"] for r in results),
            "minor_faults": max(r["minor_faults"] for r in results)}


def bare_argv(args, data_dir):
    """The options that decide a bare process's run, as given to this one."""
    return ["--layers", str(args.layers), "--hidden", str(args.hidden), "--seq", str(args.seq),
            "--micro-batch", str(args.micro_batch), "--pipe-micro-batches", str(args.pipe_micro_batches),
            "--rtd-stage", str(args.rtd_stage), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--data-dir", data_dir] + (["--checkpointing"] if args.checkpointing else []) \
        + (["--default-malloc"] if args.default_malloc else [])


# ------------------------------------------------------------------ the loop side
def loop(args, mode, data_dir):
    """`deberta-ds pretrain` of `mode` on RANKS ranks: the median step_time_s after the warmup, step 1's loss."""
    out = os.path.join(args.work, f"run-{mode}-{time.time():.0f}")
    ds, ds_sets = ds_of(args, mode)
    result = pretrain(data_dir, out, nproc=RANKS, sets=run_sets(args, mode, data_dir), ds=ds, ds_sets=ds_sets,
                      config=TINY_RUN, extra_env=malloc_env(args), timeout=None)
    if result.returncode != 0:
        sys.exit(f"error: pretrain ({mode}) failed: {explain(result)}")
    records = metrics(out)
    shutil.rmtree(out, ignore_errors=True)  # its checkpoint of the last step: hundreds of MB at the default shape
    timed = [r["step_time_s"] for r in records if "step_time_s" in r and r["step"] > args.warmup]
    first = next(r["loss"] for r in records if r["step"] == 1)
    return {"step_s": statistics.median(timed), "first_loss": first}


# ------------------------------------------------------------------ the table
def measure(args):
    os.makedirs(args.work, exist_ok=True)
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else demo_shards(args.work, args.seq)
    rounds = {mode: [] for mode in args.modes}
    for number in range(args.rounds):
        for mode in args.modes:
            # bare first in odd rounds, the loop first in even ones: a trend in the machine's load hits both alike
            sides = [("bare", bare), ("loop", loop)][::1 if number % 2 == 0 else -1]
            rounds[mode].append({side: measure_side(args, mode, data_dir) for side, measure_side in sides})
            print(f"# round {number + 1}, {mode}: {json.dumps(rounds[mode][-1])}", flush=True)
    rows = {}
    for mode, results in rounds.items():
        bare_s = statistics.median(r["bare"]["step_s"] for r in results)
        loop_s = statistics.median(r["loop"]["step_s"] for r in results)
        rows[mode] = {"bare_s": bare_s, "loop_s": loop_s, "ratio": loop_s / bare_s,
                      "bare_loader_s": statistics.median(r["bare"]["loader_s"] for r in results),
                      "first_loss_bare": results[0]["bare"]["first_loss"],
                      "first_loss_loop": results[0]["loop"]["first_loss"], "rounds": results}
    return rows


def setup_of(args):
    return {"layers": args.layers, "hidden": args.hidden, "seq": args.seq, "micro_batch": args.micro_batch,
            "ranks": RANKS, "pipe_micro_batches": args.pipe_micro_batches, "rtd_stage": args.rtd_stage,
            "checkpointing": args.checkpointing, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
            "precision": "fp32", "device": "cpu", "quick": args.quick,
            "malloc": "glibc defaults" if args.default_malloc else "steady state (bench.train_step's)"}


def print_table(rows):
    print(f"{'mode':9} | {'bare s/step':>11} | {'loop s/step':>11} | {'ratio':>6} | {'first loss bare / loop':>22}")
    for mode, row in rows.items():
        print(f"{mode:9} | {row['bare_s']:11.3f} | {row['loop_s']:11.3f} | {row['ratio']:6.3f} | "
              f"{row['first_loss_bare']:10.5f} / {row['first_loss_loop']:.5f}")
    if "pipeline" in rows:
        print("(pipeline: the pipe seeds each of its layers on its own, so its first loss is another model's)")


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        mode, rank = args.child.split(":")
        return bare_child(args, mode, int(rank))
    print(f"# {args.layers} layers x {args.hidden}, seq {args.seq}, micro-batch {args.micro_batch}, fp32 on the CPU, "
          f"{RANKS} ranks, recomputation {'on' if args.checkpointing else 'off'}, {args.warmup} + {args.steps} steps, "
          f"malloc {'glibc defaults' if args.default_malloc else 'steady state'}",
          flush=True)
    rows = measure(args)
    print_table(rows)
    if args.json:
        atomic_json(args.json, {"setup": setup_of(args), "modes": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
