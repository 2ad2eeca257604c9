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
import math
import os
import sys

from pipeline.lifecycle import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE, StopFlag, any_rank, inject_fault, run_and_finish
from pipeline.cli_types import positive_int


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
                        help="override a run-config setting, e.g. --set lr=1e-4 --set model_overrides.num_hidden_layers=2")
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
    from pipeline.launch.env import discover_env, setup_distributed
    from pipeline.train.preflight import check_job, prepare
    if args.check_only:
        return check_job(args)
    quiet_known_warnings()
    found = discover_env()
    run_config, ds = prepare(args, found.world_size, found.local_world_size, found.local_rank, found.rank == 0)
    env = setup_distributed()
    if args.deepspeed == "auto":
        from pipeline.train.auto_ds import check_same_choice
        check_same_choice(run_config, ds, env.local_rank)
    return run_and_finish(train, run_config, ds, env, args.accept_data_change)


def model_config_for(run, tokenizer):
    from pipeline.errors import ConfigError
    config = run.model_config()
    if config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                          f"(spm pieces + [MASK]); set model_overrides.vocab_size={tokenizer.padded_vocab_size}")
    return config


def data_identity(run, tokenizer):
    """What defines this run's data, as the checkpoint records it: the training shards' identity (tokenizer,
    shard contents, samples, sequence length) and the validation shards' fingerprint."""
    from pipeline.data.shards import ShardSet
    identity = ShardSet(run.data_dir, tokenizer_fingerprint=tokenizer.fingerprint).identity()
    identity["valid_shards_sha256"] = ShardSet(run.valid_data_dir).fingerprint if run.valid_data_dir else None
    return identity


def check_same_data(meta, now, source, accept_change):
    """Refuse a resume on other data, naming both. True when the training shards changed and the change is
    accepted (--accept-data-change): the loader then starts them from their first sample. Another validation
    set alone is accepted the same way but leaves the training cursor where it is."""
    from pipeline.errors import CheckpointError
    trained_with = meta.get("tokenizer_sha256")  # every build's meta file has it at the top
    if trained_with and trained_with != now["tokenizer_sha256"]:
        raise CheckpointError(f"{source}: trained with tokenizer sha256 {trained_with[:16]}..., this run's "
                              f"is {now['tokenizer_sha256'][:16]}...: the model's embeddings belong to the checkpoint's "
                              "tokenizer. Use its shards (and spm.model), or start a new run (convert to a release, "
                              "then init_from_release) to change tokenizers")
    saved = meta.get("data")
    if not saved:  # an older build recorded the tokenizer only
        return False
    training = [k for k in ("shards_sha256", "num_samples", "max_seq_len") if saved.get(k) != now.get(k)]
    differs = list(training)
    # the validation set only matters where both have one (evaluating or not leaves training as it is)
    if saved.get("valid_shards_sha256") and now.get("valid_shards_sha256") and \
            saved["valid_shards_sha256"] != now["valid_shards_sha256"]:
        differs.append("valid_shards_sha256")
    if differs and not accept_change:
        detail = "; ".join(f"{k}: checkpoint {str(saved.get(k))[:16]} vs now {str(now.get(k))[:16]}" for k in differs)
        raise CheckpointError(f"{source}: trained on other data than --data-dir/--valid-data-dir give ({detail}). Point "
                              "them at the run's shards, or add --accept-data-change to continue on these ones "
                              "deliberately (recorded in the checkpoint)")
    return bool(training)


def train(run, ds, env, accept_data_change=False):
    import torch

    from pipeline.data.mlm_loader import build_pretrain_loader
    from pipeline.data.tokenizer import Tokenizer
    from pipeline.ds_config import precision, zero_stage
    from pipeline.train import checkpoint
    from pipeline.train.engine import build_stepper
    from pipeline.train.evaluate import build_valid_loader, due, evaluate
    from pipeline.train.monitor import Monitor, guess_peak_tflops, run_flops_per_token
    from pipeline.io import make_dirs
    from pipeline.lifecycle import lock_run_directory
    from pipeline.train.preflight import dp_size_of

    rank, world = env.rank, env.world_size
    dp_size = dp_size_of(run, world)
    tokenizer = Tokenizer(run.tokenizer_path())
    model_config = model_config_for(run, tokenizer)
    ckpt_dir = os.path.join(run.output_dir, "checkpoints")
    make_dirs(ckpt_dir, "checkpoint directory")
    lock_run_directory(run.output_dir, rank, "pretraining run")
    data = data_identity(run, tokenizer)

    # resume plan, decided before the engine exists (a universal load is an engine setting)
    tag, meta = checkpoint.resume_point(ckpt_dir, rank)
    universal, data_changed, history = False, False, []
    if tag is not None:
        source = os.path.join(ckpt_dir, tag)
        checkpoint.check_compatible(meta, checkpoint.model_identity(run), source)
        data_changed = check_same_data(meta, data, source, accept_data_change)
        history = meta.get("data_history", [])
        if meta["dp_size"] != dp_size or meta["pipeline_stages"] != run.pipeline_stages:
            tag = checkpoint.ensure_universal(ckpt_dir, tag, rank)
            ds.setdefault("checkpoint", {})["load_universal"] = True
            universal = True
    torch.manual_seed(run.seed)
    stepper = build_stepper(run, ds, model_config, rank)
    torch.manual_seed(run.seed + 1 + rank)  # dropout differs per rank; restored from the checkpoint on resume
    client_state = {}
    if tag is not None:
        client_state = checkpoint.load(stepper, ckpt_dir, tag, rank, universal=universal) or {}
    step = int(client_state.get("step", 0))
    saved_data = client_state.get("data", {})
    consumed, data_start = int(saved_data.get("consumed_samples", 0)), int(saved_data.get("start_step", 0))
    if data_changed:  # continued pretraining on other shards: their order from the beginning
        consumed, data_start = 0, step
        history = history + [dict(meta.get("data") or {}, until_step=step)]
        if rank == 0:
            print(f"data change accepted at step {step}: the run continues on {run.data_dir} from its first sample "
                  "(recorded in the checkpoint)", file=sys.stderr)
    loader = build_pretrain_loader(run.data_dir, tokenizer, run.micro_batch_size, stepper.dp_rank, stepper.dp_size,
                                   run.seed, consumed_samples=consumed, masking=run.objective)
    seq_len = loader.max_seq_len
    valid_loader = build_valid_loader(run, tokenizer, stepper.dp_rank, stepper.dp_size, seq_len)
    if rank == 0:
        where = f"resumed from {tag} at step {step}" if tag else "from scratch"
        validation = (f", validation: {run.eval_steps * run.global_batch_size} of {len(valid_loader.data)} samples "
                      f"every {run.eval_interval} steps" if valid_loader else "")
        print(f"pretrain: mode {run.mode}, {world} ranks (dp {dp_size} x stages {run.pipeline_stages}), "
              f"{precision(ds)}, ZeRO {zero_stage(ds)}{stepper.describe()}, global batch "
              f"{run.global_batch_size}, {len(loader.data)} samples, {where}{validation}", file=sys.stderr)

    peak = (run.peak_tflops or guess_peak_tflops() or 0) * 1e12 * world
    monitor = Monitor(run.output_dir, rank, step, run.max_steps, run.global_batch_size * seq_len,
                      run.global_batch_size, run_flops_per_token(run, seq_len) * run.global_batch_size * seq_len,
                      peak or None)
    stop = StopFlag()
    meta_out = {**checkpoint.model_identity(run), "pipeline_stages": run.pipeline_stages,
                "dp_size": dp_size, "world_size": world, "run_config": run.to_dict(),
                "tokenizer_sha256": tokenizer.fingerprint, "data": data, "data_history": history}
    batches = stepper.batches(loader)
    nonfinite_in_a_row = 0
    code = EXIT_OK
    while step < run.max_steps:
        skipped_before = stepper.skipped_steps
        result = stepper.train_step(batches)
        loss = result["loss"]
        step += 1
        skipped = stepper.skipped_steps
        # fp16: DeepSpeed skips a step whose loss or gradients overflowed (and lowers the loss scale)
        if not math.isfinite(loss) or skipped > skipped_before:
            nonfinite_in_a_row += 1
        else:
            nonfinite_in_a_row = 0
        values = dict(result, lr=stepper.lr, grad_norm=stepper.grad_norm, loss_scale=stepper.loss_scale,
                      skipped_steps=skipped)
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
            monitor.record_eval(step, evaluate(stepper, valid_loader, run))
        signalled = any_rank(stop.raised is not None, stepper.device)
        if step % run.save_interval == 0 or step == run.max_steps or signalled:
            state = {"data": {"consumed_samples": (step - data_start) * run.global_batch_size, "seed": run.seed,
                              "start_step": data_start},
                     "run_config": run.to_dict()}
            saved = checkpoint.save(stepper, ckpt_dir, step, state, meta_out, run.keep_last, rank)
            if rank == 0:
                monitor.bar.write(f"saved checkpoint {saved}")
        inject_fault(step, rank)
        if signalled:
            if rank == 0:
                print(f"stopping on {stop.raised or 'a signal on another rank'} after step {step}: checkpoint saved; "
                      f"exit {EXIT_REQUEUE} (run again to resume)", file=sys.stderr)
            code = EXIT_REQUEUE
            break
    monitor.close()
    return code
