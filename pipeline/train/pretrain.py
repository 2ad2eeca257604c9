"""`deberta-ds pretrain`: pretraining on DeepSpeed. Objective mlm (DeBERTa-v2, the default): MLM + Enhanced Mask
Decoder, in mode zero3 or pipeline; objective rtd (DeBERTa-v3, `--set objective=rtd`): a generator and a
discriminator trained by replaced token detection with gradient-disentangled embedding sharing, in mode zero3.

Any launcher starts it unchanged: `deepspeed`, `torchrun`, `srun` (Slurm) and `mpirun` (Open MPI);
pipeline/launch/ finds rank, world size and master address in whichever environment it is.

It resumes from the newest complete checkpoint in OUTPUT_DIR/checkpoints by itself (on another number of ranks
through DeepSpeed's universal format), and only on the data the checkpoint was trained on (tokenizer, shards,
sequence length; --accept-data-change continues on other shards deliberately). A damaged newest checkpoint is
reported and the one before it used. One run per output directory (OUTPUT_DIR/deberta-ds.lock). On SIGTERM or
SIGUSR1 it finishes the step, saves a checkpoint and exits with code 75 ("checkpointed; run me again"), which the Slurm scripts turn into a requeue.
Exit codes: 0 done, 1 bad input or config, 2 usage, 3 non-finite loss (fp32/bf16) or max_nonfinite_steps
skipped steps in a row (fp16), 75 as above.
"""
import os

from pipeline.cli_types import positive_int
from pipeline.run.lifecycle import run_and_finish
from pipeline.train import resume


def add_arguments(parser):
    parser.add_argument("--config", required=True,
                        help="run config: a JSON file, or the name of a shipped one (tiny_cpu, xxlarge, v3_large: "
                             "configs/pretrain_NAME.json)")
    parser.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", required=True,
                        help="DeepSpeed config: a JSON file, the name of a shipped one (zero1_bf16, zero3_bf16, "
                        "pipeline_zero1_bf16, cpu_zero3_fp32, ...: ds_configs/NAME.json), or auto: the fastest "
                        "configuration that fits this job's devices (ZeRO stage, precision, micro-batch up to the "
                        "run's, recomputation; `deberta-ds plan` shows the choice)")
    parser.add_argument("--data-dir", help="shard directory from `deberta-ds preprocess` (overrides data_dir)")
    parser.add_argument("--valid-data-dir", help="held-out shard directory, same tokenizer: its losses (rtd: both "
                        "networks') every eval_interval steps (overrides valid_data_dir)")
    parser.add_argument("--output-dir", help="run directory: checkpoints, tensorboard, metrics.jsonl (overrides output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config setting, e.g. --set lr=1e-4 --set model_overrides.num_hidden_layers=2; "
                             "long sequences: --set sequence_parallel_size=SP splits each one over SP ranks "
                             "(DeepSpeed Ulysses, mode zero3)")
    parser.add_argument("--ds", action="append", default=[], metavar="KEY=VALUE",
                        help="override a DeepSpeed-config setting, e.g. --ds bf16.enabled=true --ds zero_optimization.stage=1")
    parser.add_argument("--accept-data-change", action="store_true",
                        help="resume although --data-dir (or --valid-data-dir) holds other shards than the checkpoint "
                        "was trained on: continued pretraining on a new corpus. Recorded in the checkpoint; the data "
                        "cursor starts at the new shards' beginning. Another tokenizer is never accepted.")
    parser.add_argument("--check-only", action="store_true",
                        help="check the configs, data and tokenizer for a job of --nodes x --ranks-per-node ranks, "
                        "then exit (0: fine; 1: the message says what is wrong); nothing is started")
    parser.add_argument("--nodes", type=positive_int, default=1, help="with --check-only: nodes of the job (default 1)")
    parser.add_argument("--ranks-per-node", type=positive_int, default=1,
                        help="with --check-only: training processes per node (default 1)")


def quiet_known_warnings():
    import warnings
    # DeepSpeed calls torch's all_gather_into_tensor/reduce_scatter_tensor, deprecated in torch 2.13: one
    # FutureWarning per call and rank, nothing for the user to act on
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")


def run(args):
    from pipeline.launch.env import check_master_addr, discover_env, setup_distributed
    from pipeline.train.preflight import check_job, prepare
    if args.check_only:
        return check_job(args)
    quiet_known_warnings()
    found = discover_env()
    check_master_addr(found)  # before prepare creates the run directory
    run_config, ds = prepare(args, found.world_size, found.local_world_size, found.local_rank, found.rank == 0)
    env = setup_distributed()
    if args.deepspeed == "auto":
        from pipeline.train.auto_ds import check_same_choice
        check_same_choice(run_config, ds, env.local_rank)
    return run_and_finish(train, run_config, ds, env, args.accept_data_change)


def train(run, ds, env, accept_data_change=False):
    """One pretraining run on the shared loop (pipeline/run/loop.py); returns the exit code."""
    from pipeline.data.mlm_loader import build_pretrain_loader
    from pipeline.data.tokenizer import Tokenizer
    from pipeline.errors import DataError
    from pipeline.run import loop
    from pipeline.run.checkpointer import Checkpointer, ensure_universal
    from pipeline.run.ds_config import precision, zero_stage
    from pipeline.run.lifecycle import lock_run_directory, say, seed_for_build, seed_for_steps
    from pipeline.run.monitor import Monitor, guess_peak_tflops, run_flops_per_token
    from pipeline.train.evaluate import build_valid_loader, due, evaluate
    from pipeline.train.modes import build_stepper
    from pipeline.train.preflight import dp_size_of

    rank, world = env.rank, env.world_size
    dp_size = dp_size_of(run, world)
    tokenizer = Tokenizer(run.tokenizer_path())
    model_config = run.model_config()
    tokenizer.check_fits(model_config.vocab_size, "model vocab_size",
                         f"set model_overrides.vocab_size={tokenizer.padded_vocab_size}")
    checkpointer = Checkpointer(os.path.join(run.output_dir, "checkpoints"), rank, run.save_interval, run.keep_last)
    lock_run_directory(run.output_dir, rank, "pretraining run")
    data = resume.data_identity(run, tokenizer)
    if data["max_seq_len"] % run.sequence_parallel_size:
        raise DataError(f"{run.data_dir}: sequences of {data['max_seq_len']} tokens do not split over "
                        f"sequence_parallel_size {run.sequence_parallel_size} ranks; preprocess with a --max-seq-len "
                        "that it divides")

    # resume plan, decided before the engine exists (a universal load is an engine setting)
    tag, meta = checkpointer.resume_point()
    universal, data_changed, history, changes, changed_before = False, False, [], {}, []
    if tag is not None:
        source = os.path.join(checkpointer.dir, tag)
        resume.check_compatible(meta, resume.model_identity(run), source)
        data_changed = resume.check_same_data(meta, data, source, accept_data_change)
        changes = resume.check_run_changes(meta, run, source)
        history, changed_before = meta.get("data_history", []), meta.get("changes", [])
        resume.check_engine_changes(meta, zero_stage(ds), precision(ds), source)
        # another partitioning of the engine's states: through the universal checkpoint
        if (meta["dp_size"] != dp_size or meta["pipeline_stages"] != run.pipeline_stages
                or meta.get("sequence_parallel_size", 1) != run.sequence_parallel_size):
            tag = ensure_universal(checkpointer.dir, tag, rank)
            ds.setdefault("checkpoint", {})["load_universal"] = True
            universal = True
    seed_for_build(run.seed)
    stepper = build_stepper(run, ds, model_config, rank)
    seed_for_steps(run.seed, rank)  # restored from the checkpoint on resume
    client_state = {}
    if tag is not None:
        client_state = resume.load(checkpointer, stepper, tag, universal, changes)
    step = int(client_state.get("step", 0))
    saved_data = client_state.get("data", {})
    consumed, data_start = int(saved_data.get("consumed_samples", 0)), int(saved_data.get("start_step", 0))
    if data_changed:  # continued pretraining on other shards: their order from the beginning
        consumed, data_start = 0, step
        history = history + [dict(meta.get("data") or {}, until_step=step)]
        say(rank, f"data change accepted at step {step}: the run continues on {run.data_dir} from its first sample "
                  "(recorded in the checkpoint)")
    if changes:
        say(rank, f"resumed with changed settings at step {step}: " + ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items())) + " (the schedule follows them from here; "
            "recorded in the checkpoint)")
        changed_before = changed_before + [{"step": step, **changes}]
    loader = build_pretrain_loader(run.data_dir, tokenizer, run.micro_batch_size, stepper.dp_rank, stepper.dp_size,
                                   run.seed, consumed_samples=consumed, masking=run.objective)
    stepper.feed(loader)
    seq_len = loader.max_seq_len
    valid_loader = build_valid_loader(run, tokenizer, stepper.dp_rank, stepper.dp_size, seq_len)
    where = f"resumed from {tag} at step {step}" if tag else "from scratch"
    validation = (f", validation: {run.eval_steps * run.global_batch_size} of {len(valid_loader.data)} samples "
                  f"every {run.eval_interval} steps" if valid_loader else "")
    split = f" x sequence parallel {run.sequence_parallel_size}" if run.sequence_parallel_size > 1 else ""
    say(rank, f"pretrain: mode {run.mode}, {world} ranks (dp {dp_size} x stages {run.pipeline_stages}{split}), "
              f"{precision(ds)}, ZeRO {zero_stage(ds)}{stepper.describe()}, global batch "
              f"{run.global_batch_size}, {len(loader.data)} samples, {where}{validation}")

    checkpointer.meta = {**resume.model_identity(run), "pipeline_stages": run.pipeline_stages, "dp_size": dp_size,
                         "sequence_parallel_size": run.sequence_parallel_size, "world_size": world,
                         "zero_stage": zero_stage(ds), "precision": precision(ds),
                         "run_config": run.to_dict(), "tokenizer_sha256": tokenizer.fingerprint, "data": data,
                         "data_history": history, "changes": changed_before}
    peak = (run.peak_tflops or guess_peak_tflops() or 0) * 1e12 * world
    monitor = Monitor(run.output_dir, rank, step, run.max_steps, run.global_batch_size * seq_len,
                      run.global_batch_size, run_flops_per_token(run, seq_len) * run.global_batch_size * seq_len,
                      peak or None)

    evaluation = loop.Hook(due=lambda at: valid_loader is not None and due(run, at),
                           run=lambda at: monitor.record_eval(at, evaluate(stepper, valid_loader, run)))

    def data_position(at):
        return {"data": {"consumed_samples": (at - data_start) * run.global_batch_size, "seed": run.seed,
                         "start_step": data_start},
                "run_config": run.to_dict()}

    settings = loop.LoopSettings(total_steps=run.max_steps, log_interval=run.log_interval, precision=precision(ds),
                                 max_nonfinite_steps=run.max_nonfinite_steps)
    try:
        return loop.train(stepper, checkpointer, monitor, step, settings, hooks=[evaluation],
                          client_state=data_position)
    finally:
        monitor.close()
