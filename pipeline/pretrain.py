"""`deberta-ds pretrain`: MLM + Enhanced Mask Decoder pretraining on DeepSpeed.

Any launcher starts it unchanged: `deepspeed`, `torchrun`, `srun` (Slurm) and `mpirun` (Open MPI);
pipeline/launch.py finds rank, world size and master address in whichever environment it is.

    deberta-ds pretrain --config configs/pretrain_xxlarge.json --deepspeed ds_configs/zero3_bf16.json \\
        --data-dir SHARDS --output-dir RUN [--valid-data-dir HELD_OUT_SHARDS] \\
        [--set lr=1e-4 --set mode=pipeline ...] [--ds bf16.enabled=false ...]

It resumes from the newest finished checkpoint in RUN/checkpoints by itself (on another number of
ranks through DeepSpeed's universal format). On SIGTERM or SIGUSR1 it finishes the step, saves a
checkpoint and exits with code 75 (EX_TEMPFAIL: "checkpointed; run me again"), which the Slurm scripts
turn into a requeue. Exit codes: 0 done, 1 bad input/config, 2 usage, 3 non-finite loss (fp32/bf16) or
max_nonfinite_steps skipped steps in a row (fp16), 75 as above.
"""
import argparse
import json
import math
import os
import signal
import sys

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_REQUEUE = 0, 1, 3, 75


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="run config JSON (configs/pretrain_*.json)")
    parser.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", required=True,
                        help="DeepSpeed config JSON (ds_configs/*.json)")
    parser.add_argument("--data-dir", help="shard directory from `deberta-ds preprocess` (overrides data_dir)")
    parser.add_argument("--valid-data-dir", help="held-out shard directory, same tokenizer: its MLM loss every "
                        "eval_interval steps (overrides valid_data_dir)")
    parser.add_argument("--output-dir", help="run directory: checkpoints, tensorboard, metrics.jsonl (overrides output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config setting, e.g. --set lr=1e-4 --set model_overrides.num_hidden_layers=2")
    parser.add_argument("--ds", action="append", default=[], metavar="KEY=VALUE",
                        help="override a DeepSpeed-config setting, e.g. --ds bf16.enabled=true --ds zero_optimization.stage=1")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; not needed otherwise")


class StopFlag:
    """SIGTERM/SIGUSR1 only set a flag: the step in flight finishes, all ranks agree, then we save."""

    def __init__(self):
        self.raised = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.handle)

    def handle(self, signum, _frame):
        self.raised = signal.Signals(signum).name


def agree(flag, device):
    """True on every rank if it is True on any (a signal may reach the ranks at different times)."""
    import torch
    import torch.distributed as dist
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value, device, group=None):
    import torch
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)


def quiet_known_warnings():
    import warnings
    # DeepSpeed calls torch's all_gather_into_tensor/reduce_scatter_tensor, deprecated in torch 2.13: one
    # FutureWarning per call and rank, nothing for the user to act on
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")


def setup_distributed(args):
    from pipeline.launch import apply_runtime_defaults, discover_env, export_env
    env = discover_env()
    if args.local_rank is not None and env.source == "single":
        env.local_rank = args.local_rank
    export_env(env)
    apply_runtime_defaults(env)
    import deepspeed
    deepspeed.init_distributed(auto_mpi_discovery=False)
    return env


def prepare(args, world_size):
    """Everything that can fail on bad input, before DeepSpeed starts: (run config, full DeepSpeed config)."""
    from pipeline.run_config import RunConfig, complete_ds_config, default_tokenizer, load_ds_config
    overrides = list(args.set)
    if args.data_dir:
        overrides.append(f"data_dir={json.dumps(args.data_dir)}")
    if args.output_dir:
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    if args.valid_data_dir:
        overrides.append(f"valid_data_dir={json.dumps(args.valid_data_dir)}")
    run = RunConfig.from_file(args.config, overrides)
    if not run.output_dir:
        raise ValueError("no output directory: give --output-dir or output_dir in the run config")
    if not run.data_dir or not os.path.isdir(run.data_dir):
        raise ValueError(f"data directory {run.data_dir!r} does not exist (give --data-dir)")
    if run.valid_data_dir and not os.path.isdir(run.valid_data_dir):
        raise ValueError(f"validation directory {run.valid_data_dir!r} does not exist")
    if not os.path.exists(default_tokenizer(run)):
        raise ValueError(f"{default_tokenizer(run)}: no tokenizer (the shard directory carries spm.model; or set tokenizer)")
    ds = complete_ds_config(run, load_ds_config(args.deepspeed, args.ds), dp_size_of(run, world_size),
                            source=args.deepspeed)
    return run, ds


def dp_size_of(run, world_size):
    if world_size % run.pipeline_stages:
        raise ValueError(f"world size {world_size} is not divisible by pipeline_stages {run.pipeline_stages}")
    return world_size // run.pipeline_stages


def model_config_for(run, tokenizer):
    config = run.model_config()
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                         f"(spm pieces + [MASK]); set model_overrides.vocab_size={tokenizer.padded_vocab_size}")
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(prog="deberta-ds pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args):
    from pipeline.launch import discover_env
    quiet_known_warnings()
    try:
        run_config, ds = prepare(args, discover_env().world_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    env = setup_distributed(args)
    from model.release import CheckpointError
    from pipeline.checkpoint import ResumeError
    from pipeline.shards import ShardError
    try:
        code = train(run_config, ds, env)
    except (ValueError, ResumeError, ShardError, CheckpointError) as e:
        print(f"error (rank {env.rank}): {e}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    finish(code)


def finish(code):
    """Leave deliberately: a barrier, flushed output, then os._exit. torch's gloo teardown at interpreter
    exit sometimes aborts a finished rank ("terminate called without an active exception"), which
    would make a successful run look failed to the launcher (see DEEPSPEED_NOTES)."""
    import torch.distributed as dist
    try:
        if dist.is_initialized() and code in (EXIT_OK, EXIT_REQUEUE):
            dist.barrier()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def train(run, ds, env):
    import torch
    from pipeline import checkpoint
    from pipeline.data import build_pretrain_loader
    from pipeline.engine import build_engine
    from pipeline.evaluate import build_valid_loader, due, evaluate
    from pipeline.observe import Monitor, flops_per_token, guess_peak_tflops
    from pipeline.pipe import pipeline_batches
    from pipeline.run_config import default_tokenizer, precision, zero_stage
    from pipeline.tokenizer import Tokenizer

    rank, world = env.rank, env.world_size
    dp_size = dp_size_of(run, world)
    tokenizer = Tokenizer(default_tokenizer(run))
    model_config = model_config_for(run, tokenizer)
    ckpt_dir = os.path.join(run.output_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)

    # resume plan, decided before the engine exists (a universal load is an engine setting)
    tag, meta = checkpoint.latest(ckpt_dir)
    universal = False
    if tag is not None:
        checkpoint.check_compatible(meta, model_config.to_dict(), run.mode, os.path.join(ckpt_dir, tag))
        if meta["dp_size"] != dp_size or meta["pipeline_stages"] != run.pipeline_stages:
            tag = checkpoint.ensure_universal(ckpt_dir, tag, rank)
            ds.setdefault("checkpoint", {})["load_universal"] = True
            universal = True
    torch.manual_seed(run.seed)
    engine, module = build_engine(run, ds, model_config, rank)
    device = engine.device
    dp_rank = engine.grid.get_data_parallel_id() if run.mode == "pipeline" else rank
    torch.manual_seed(run.seed + 1 + rank)  # dropout differs per rank; restored from the checkpoint on resume
    client_state = {}
    if tag is not None:
        client_state = checkpoint.load(engine, ckpt_dir, tag, rank, universal=universal) or {}
    step = int(client_state.get("step", 0))
    consumed = int(client_state.get("data", {}).get("consumed_samples", 0))
    loader = build_pretrain_loader(run.data_dir, tokenizer, run.micro_batch_size, dp_rank, dp_size, run.seed,
                                   consumed_samples=consumed)
    seq_len = loader.max_seq_len
    valid_loader = build_valid_loader(run, tokenizer, dp_rank, dp_size, seq_len)
    if rank == 0:
        where = f"resumed from {tag} at step {step}" if tag else "from scratch"
        validation = (f", validation: {run.eval_steps * run.global_batch_size} of {len(valid_loader.data)} samples "
                      f"every {run.eval_interval} steps" if valid_loader else "")
        print(f"pretrain: mode {run.mode}, {world} ranks (dp {dp_size} x stages {run.pipeline_stages}), "
              f"{precision(ds)}, ZeRO {zero_stage(ds)}{leaf_note(module, model_config.num_hidden_layers)}, global batch "
              f"{run.global_batch_size}, {len(loader.data)} samples, {where}{validation}", file=sys.stderr)

    peak = (run.peak_tflops or guess_peak_tflops() or 0) * 1e12 * world
    monitor = Monitor(run.output_dir, rank, step, run.max_steps, run.global_batch_size * seq_len,
                      run.global_batch_size, flops_per_token(model_config, seq_len) * run.global_batch_size * seq_len,
                      peak or None)
    stop = StopFlag()
    kill_at = int(os.environ.get("DEBERTA_DS_FAULT_KILL_AT_STEP", "0"))  # fault injection for resume tests
    meta_out = {"model_config": model_config.to_dict(), "mode": run.mode, "pipeline_stages": run.pipeline_stages,
                "dp_size": dp_size, "run_config": run.to_dict(), "tokenizer_sha256": tokenizer.fingerprint}
    data_iter = iter(loader) if run.mode != "pipeline" else pipeline_batches(iter(loader))
    nonfinite_in_a_row = 0
    code = EXIT_OK
    while step < run.max_steps:
        skipped_before = getattr(engine, "skipped_steps", 0)
        if run.mode == "pipeline":
            loss, accuracy = engine.train_batch(data_iter=data_iter).item(), None  # already averaged over DP
        else:
            loss, accuracy = zero_step(engine, data_iter, ds["gradient_accumulation_steps"], device)
            loss = mean_over_ranks(loss, device)
        step += 1
        skipped = getattr(engine, "skipped_steps", 0)
        # fp16: DeepSpeed skips a step whose loss or gradients overflowed (and lowers the loss scale)
        if not math.isfinite(loss) or skipped > skipped_before:
            nonfinite_in_a_row += 1
        else:
            nonfinite_in_a_row = 0
        values = {"loss": loss, "mlm_accuracy": accuracy, "lr": engine.get_lr()[0],
                  "grad_norm": _grad_norm(engine), "loss_scale": _loss_scale(engine), "skipped_steps": skipped}
        monitor.step(step, values)
        monitor.record_loss(step, loss)
        if step % run.log_interval == 0 or step == run.max_steps:
            monitor.log(step, values)
        if nonfinite_in_a_row and (precision(ds) != "fp16" or nonfinite_in_a_row >= run.max_nonfinite_steps):
            if rank == 0:
                print(f"error: {nonfinite_in_a_row} non-finite or skipped step(s) in a row at step {step} "
                      f"({precision(ds)}); stopping without saving. Resume from the last checkpoint with a lower "
                      f"lr or bf16.", file=sys.stderr)
            code = EXIT_NONFINITE
            break
        if valid_loader is not None and due(run, step):
            monitor.record_eval(step, evaluate(engine, valid_loader, run, ds["gradient_accumulation_steps"], device))
        signalled = agree(stop.raised is not None, device)
        if step % run.save_interval == 0 or step == run.max_steps or signalled:
            state = {"data": {"consumed_samples": step * run.global_batch_size, "seed": run.seed},
                     "run_config": run.to_dict()}
            saved = checkpoint.save(engine, ckpt_dir, step, state, meta_out, run.keep_last, rank)
            if rank == 0:
                monitor.bar.write(f"saved checkpoint {saved}")
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if signalled:
            if rank == 0:
                print(f"stopping on {stop.raised or 'a signal on another rank'} after step {step}: checkpoint saved; "
                      f"exit {EXIT_REQUEUE} (run again to resume)", file=sys.stderr)
            code = EXIT_REQUEUE
            break
    monitor.close()
    return code


def leaf_note(module, num_layers):
    """' (k of n encoder layers gathered whole)' when ZeRO-3 treats some layers as leaf modules."""
    from deepspeed.utils import get_z3_leaf_modules
    leaves = len(get_z3_leaf_modules(module))
    return f" ({leaves} of {num_layers} encoder layers gathered whole)" if leaves else ""


def zero_step(engine, data_iter, accumulation, device):
    """One optimizer step of the ZeRO engine: `accumulation` micro-batches. Returns this rank's mean
    micro-batch loss and MLM accuracy."""
    losses, correct, predicted = [], 0, 0
    for _ in range(accumulation):
        batch = {k: v.to(device) for k, v in next(data_iter).items()}
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        correct += (out.logits.argmax(-1) == out.labels).sum().item()
        predicted += out.labels.numel()
    return sum(losses) / len(losses), correct / max(predicted, 1)


def _grad_norm(engine):
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    try:
        return float(norm) if norm is not None else None
    except (TypeError, ValueError):
        return None


def _loss_scale(engine):
    optimizer = getattr(engine, "optimizer", None)
    scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
    try:
        return float(scale) if scale is not None else None
    except (TypeError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
