"""`deberta-ds finetune`: fine-tune a release on one SuperGLUE task (or GLUE MNLI) under DeepSpeed.

    deberta-ds finetune --task CB --release DIR --data-dir DIR --output-dir OUT \\
        [--deepspeed finetune_zero2_bf16] [--lr 3e-6 --epochs 10 ...] [--set key=value ...]

Settings: the task's preset (pipeline/finetune/presets/superglue.json), then --preset-overrides FILE.json,
then --set key=value (dotted keys reach into "sift"), then the named options (--lr, --batch-size, ...): the
last one wins. Unknown keys and wrong types are refused. The resolved values are printed and kept in
OUT/metrics.json.

Batches (pipeline/finetune/batches.py): a shuffled order per (seed, epoch), grouped by length so that a batch
holds examples of similar length (--set group_by_length=false: plain shuffling); the fraction of padded
positions is logged per epoch and kept in metrics.json. Evaluation batches by length too.

Training: AdamW with no weight decay on biases and LayerNorm weights, linear warmup then linear decay
(pipeline/run/optim.py), gradient clipping (clip_grad_norm) by DeepSpeed. The DeepSpeed config gives the ZeRO
stage and precision; its batch-size and clipping fields are filled from the settings (absent or "auto"
there, or equal). Each epoch ends with an evaluation on the val split; the best epoch (by the task's
leaderboard score) is written as a release directory OUT/best (fp32 master weights; transformers loads it;
its config.json names the task and labels, which `deberta-ds predict` checks) and the table of all epochs
goes to the screen and OUT/metrics.json.

SiFT (pipeline/finetune/sift.py): --sift auto (default) follows the preset only for the 1.5B model, as in the
paper ("we only apply SiFT to DeBERTa1.5B on SuperGLUE tasks"); --sift on|off decides explicitly.

Preemption: on SIGTERM or SIGUSR1 the ranks finish the optimizer step in flight, save a checkpoint with the
loop's position in OUT/checkpoints and exit 75; the same command run again continues from there, with the
results of an uninterrupted run. A checkpoint written with other settings, data, start or number of ranks
is refused; it is removed when the run ends. One run per output directory (OUT/deberta-ds.lock).

Starting from an MNLI-fine-tuned release (--init-from-mnli DIR, for RTE, CB, COPA): the encoder and pooler
come from the MNLI model, and each output of the new classifier from the MNLI classifier row named by the
task (CB: all three rows; RTE: neutral, entailment; COPA: entailment).

The run is the shared run loop (pipeline/run/loop.py) driving a FinetuneStepper (stepper.py); like pretraining
it writes OUT/metrics.jsonl (every step's loss, a line per log interval and per epoch's evaluation) and
OUT/tensorboard, and stops on a non-finite loss (exit 3; the best epoch saved before stays in OUT/best).

A finished run's directory is not fine-tuned into again with other settings, data or start: the run is refused
naming what differs (--overwrite replaces it deliberately).

Exit codes: 0 done; 1 bad input (data, release, settings), one line; 2 usage; 3 non-finite loss; 75
checkpointed on a signal.
"""
import json
import os
import time

import torch

from pipeline.errors import ConfigError

TASK_NAMES = "BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC or MNLI"
LOG_INTERVAL = 10  # optimizer steps between log lines in metrics.jsonl and TensorBoard


# ---------------------------------------------------------------- command line
def add_arguments(parser):
    from pipeline.finetune.config import add_named_options
    parser.add_argument("--task", required=True, help=f"task to fine-tune: {TASK_NAMES}")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--release", help="release directory to start from (pretrained or fine-tuned)")
    start.add_argument("--init-from-mnli", metavar="DIR",
                       help="start from this MNLI-fine-tuned release: its encoder and pooler, and the new "
                       "classifier rows copied from the MNLI rows the task names (RTE, CB, COPA)")
    parser.add_argument("--data-dir", help="official SuperGLUE layout DIR/<Task>/{train,val}.jsonl (MNLI: GLUE "
                        "TSVs); without it the data come from `datasets`")
    parser.add_argument("--output-dir", required=True,
                        help="where metrics.json, metrics.jsonl, tensorboard/ and the best release (OUT/best) go; "
                        "after SIGTERM/SIGUSR1 (exit 75) also OUT/checkpoints, from which the same command continues")
    parser.add_argument("--overwrite", action="store_true",
                        help="fine-tune into a directory that holds a finished run of other settings, data or start "
                        "(its best/ and metrics are replaced); without it such a run is refused")
    parser.add_argument("--deepspeed", default=None,
                        help="DeepSpeed config: a JSON file or a shipped name (default: finetune_zero2_bf16 with a "
                        "GPU, finetune_cpu without; also finetune_cpu_zero3)")
    parser.add_argument("--tokenizer", help="sentencepiece model (default: spm.model in the release directory)")
    parser.add_argument("--preset-overrides", metavar="FILE",
                        help="JSON object overlaid on the task's preset (same keys as presets/superglue.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (JSON value; dotted keys for nested ones, e.g. "
                        "sift.vat_lambda=3); repeatable")
    add_named_options(parser)
    parser.add_argument("--sift", choices=("auto", "on", "off"), default="auto",
                        help="SiFT adversarial training: auto (default) = the preset's setting for the 1.5B model, "
                        "off for other sizes; on / off decide explicitly")
    parser.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the weights in the best release (default float32)")


def run(args):
    from pipeline.run.lifecycle import run_and_finish
    return run_and_finish(lambda: finetune(run_of(args)))


def run_of(args):
    """The command line as a FinetuneRun: past here nothing reads `args`."""
    from pipeline.finetune.config import FinetuneRun
    from pipeline.finetune.tasks import get_task
    task = get_task(args.task)
    if task.predicted_by:
        raise ConfigError(f"{task.name} has no training data: it is predicted by the {task.predicted_by} model "
                          f"(`deberta-ds predict --task {task.name} --model {task.predicted_by}_RELEASE`)")
    return FinetuneRun.from_args(args, task)


# ---------------------------------------------------------------- settings
def batch_layout(settings, world_size):
    """(micro batch per rank, the DeepSpeed batch fields) for the global batch size."""
    from pipeline.run.ds_config import batch_fields
    micro = settings.micro_batch_size or max(settings.batch_size // world_size, 1)
    fields = batch_fields(settings.batch_size, micro, world_size, names=("batch_size", "micro_batch_size"))
    settings.micro_batch_size = micro
    settings.eval_batch_size = settings.eval_batch_size or micro
    return micro, fields


def ds_config_for(run, fields):
    """The DeepSpeed config (by path or shipped name) completed with the batch sizes and the clipping."""
    from pipeline.run.ds_config import complete_ds_config, load_ds_config
    name = run.deepspeed or ("finetune_zero2_bf16" if torch.cuda.is_available() else "finetune_cpu")
    ds, path = load_ds_config(name)
    ds = complete_ds_config(ds, dict(fields, gradient_clipping=float(run.settings.clip_grad_norm)), path,
                            "the fine-tuning settings")
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds, path


def tokenizer_path(run):
    path = run.tokenizer or os.path.join(run.start, "spm.model")
    if not os.path.isfile(path):
        raise ConfigError(f"no tokenizer at {path}: pass --tokenizer SPM_MODEL")
    return path


def run_identity(run, task, tokenizer, features, world_size):
    """What a resumed (or rerun) fine-tuning run must share with the one before it, by content where it can:
    the task, the start directory and its config, the tokenizer, the training features' ids, the settings and
    the number of ranks."""
    import hashlib
    ids = hashlib.sha256()
    for feature in features:
        for key in sorted(feature):
            ids.update(json.dumps([key, feature[key]], sort_keys=True, default=str).encode())
    config = os.path.join(run.start, "config.json")
    config_sha = hashlib.sha256(open(config, "rb").read()).hexdigest() if os.path.isfile(config) else None
    values = {"task": task.name, "start": os.path.abspath(run.start), "start_config_sha256": config_sha,
              "tokenizer_sha256": tokenizer.fingerprint, "train_features_sha256": ids.hexdigest(),
              "world_size": world_size}
    values.update(flat("settings", run.settings.to_dict()))  # one key per setting: a difference names it
    return json.loads(json.dumps(values, default=str))


def flat(prefix, values):
    out = {}
    for key, value in values.items():
        out.update(flat(f"{prefix}.{key}", value) if isinstance(value, dict) else {f"{prefix}.{key}": value})
    return out


def check_same_run(meta, identity, source, fix):
    saved = meta.get("run", {})
    differs = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if differs:
        raise ConfigError(f"{source}: saved by a run with another {', '.join(differs)}; {fix}")


# ---------------------------------------------------------------- the run
def finetune(run):
    from pipeline.data.tokenizer import Tokenizer
    from pipeline.finetune.inference import evaluate
    from pipeline.finetune.results import metrics_table, save_best
    from pipeline.finetune.start import build_model, check_length, resolve_sift, set_cls_dropout
    from pipeline.finetune.stepper import FinetuneStepper
    from pipeline.finetune.tasks import get_task
    from pipeline.io import atomic_json, check_output_identity, make_dirs
    from pipeline.launch.env import check_master_addr, discover_env, setup_distributed
    from pipeline.run import loop
    from pipeline.run.checkpointer import Checkpointer
    from pipeline.run.ds_config import precision, zero_stage
    from pipeline.run.lifecycle import EXIT_OK, lock_run_directory, on_rank_zero, say, seed_for_build, seed_for_steps
    from pipeline.run.monitor import Monitor

    task, settings = get_task(run.task), run.settings
    env = discover_env()
    check_master_addr(env)  # here, before the output directory exists
    rank, world_size = env.rank, env.world_size
    _, fields = batch_layout(settings, world_size)
    ds, ds_path = ds_config_for(run, fields)
    if settings.start_from == "MNLI" and not run.init_from_mnli:
        say(rank, f"note: the {task.name} preset starts from the MNLI-fine-tuned model; this run starts from "
                  f"{run.release} (pass --init-from-mnli DIR to follow the preset)")

    # Everything that can fail on bad input happens before the process group exists.
    spm_path = tokenizer_path(run)
    tokenizer = Tokenizer(spm_path)
    train_examples, val_examples = task.load("train", run.data_dir), task.load("val", run.data_dir)
    train_features = task.build_features(train_examples, tokenizer, settings.max_seq_len)
    val_features = task.build_features(val_examples, tokenizer, settings.max_seq_len)
    seed_for_build(settings.seed)
    model = build_model(run, task, settings.attention_impl, partitioned=zero_stage(ds) == 3)
    tokenizer.check_fits(model.config.vocab_size, f"the vocabulary of {run.start}",
                         "pass the tokenizer the release was trained with (--tokenizer)")
    check_length(model.config, settings.max_seq_len, run.start)
    set_cls_dropout(model, settings.cls_drop_out)
    sift = resolve_sift(settings, model.config)
    identity = run_identity(run, task, tokenizer, train_features, world_size)
    make_dirs(run.output_dir, "output directory")

    setup_distributed()
    lock_run_directory(run.output_dir, rank, "fine-tuning run")
    # one record of what this directory holds (pipeline/io.py): another run's settings, data or start are refused
    on_rank_zero(rank, check_output_identity, run.output_dir, "fine-tuning run", identity,
                 "its best/ and metrics would be replaced: use another --output-dir, or add --overwrite to replace "
                 "that run", run.overwrite)
    stepper = FinetuneStepper(model, ds, settings, train_features,
                              dict(lambda_=sift.vat_lambda if sift.enabled else 0.0, init=sift.vat_init_perturbation,
                                   step=sift.vat_learning_rate, ascent_loss=sift.vat_loss_fn), rank, world_size)
    seed_for_steps(settings.seed, rank)  # restored from the checkpoint on resume
    say(rank, f"{task.name}: {len(train_examples)} train / {len(val_examples)} val examples ({len(train_features)} / "
              f"{len(val_features)} sequences), {world_size} rank(s), {stepper.total_steps} steps; DeepSpeed config "
              f"{ds_path}")
    say(rank, "settings: " + json.dumps(settings.to_dict(), sort_keys=True))
    say(rank, f"SiFT: {'on, λ=' + str(sift.vat_lambda) if stepper.sift.enabled else 'off'}")

    # preemption: the loop's position, every rank's RNG and the epoch's loss sums (pipeline/run/checkpointer.py)
    checkpointer = Checkpointer(os.path.join(run.output_dir, "checkpoints"), rank, interval=None, keep_last=1,
                                meta={"run": identity})
    tag, meta = checkpointer.resume_point()
    state = {}
    if tag is not None:
        check_same_run(meta, identity, os.path.join(checkpointer.dir, tag),
                       f"remove {checkpointer.dir} to start again, or use another --output-dir")
        state = checkpointer.load(stepper, tag)
    step = int(state.get("step", 0))
    stepper.restore(state, step)
    if tag is not None:
        say(rank, f"resumed from {checkpointer.dir} at epoch {stepper.epoch}, optimizer step {step}")
    results = {"epochs": state.get("epochs", []), "best": state.get("best")}
    best_dir = os.path.join(run.output_dir, "best")
    started = time.time() - state.get("elapsed_s", 0.0)
    epoch_started = [time.time()]
    monitor = Monitor(run.output_dir, rank, step, stepper.total_steps)

    def end_of_epoch(at):
        """After an epoch's last step: its losses, the val scores, the best release, the records."""
        train_loss, task_loss, adv_loss = stepper.epoch_losses()
        train_s = time.time() - epoch_started[0]  # this epoch's training (after a resume: since the resume)
        scores = evaluate(stepper.engine, task, val_examples, val_features, settings.eval_batch_size, rank, world_size)
        record = {"epoch": stepper.epoch, "step": at, "lr": stepper.lr, "train_loss": train_loss,
                  "task_loss": task_loss, "adv_loss": adv_loss if stepper.sift.enabled else None, "val": scores,
                  "padding_fraction": round(stepper.padding, 4), "train_s": round(train_s, 2),
                  "elapsed_s": round(time.time() - started, 1)}
        results["epochs"].append(record)
        best = results["best"]
        improved = best is None or scores["score"] > best["val"]["score"]
        if improved:
            results["best"] = record
            save_best(stepper.engine, task, best_dir, spm_path, run.save_dtype, rank)
        monitor.record_eval(at, dict({f"val_{k}": v for k, v in scores.items()}, epoch=stepper.epoch,
                                     epoch_train_loss=train_loss, padding_fraction=record["padding_fraction"]))
        monitor.say(f"epoch {stepper.epoch}: train loss {train_loss:.4f} (task {task_loss:.4f}"
                    + (f", adv {adv_loss:.4f}" if stepper.sift.enabled else "") + f"), padding {stepper.padding:.1%}, "
                    f"{train_s:.1f} s, val " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                    + (" (best, saved)" if improved else ""))
        epoch_started[0] = time.time()

    def position(at):
        return {"epochs": results["epochs"], "best": results["best"], "elapsed_s": time.time() - started}

    settings_of_loop = loop.LoopSettings(total_steps=stepper.total_steps, log_interval=LOG_INTERVAL,
                                         precision=precision(ds),
                                         lower_lr_hint="Run again with a lower --lr (or bf16) in a new --output-dir.")
    try:
        epoch_end = loop.Hook(due=lambda at: at % stepper.steps_per_epoch == 0, run=end_of_epoch)
        code = loop.train(stepper, checkpointer, monitor, step, settings_of_loop, hooks=[epoch_end],
                          client_state=position)
    finally:
        monitor.close()
    if code != EXIT_OK:
        return code
    epochs, best = results["epochs"], results["best"]
    summary = {"task": task.name, "start": run.start, "start_kind": "release" if run.release else "mnli",
               "data_dir": run.data_dir, "deepspeed_config": ds_path, "world_size": world_size,
               "settings": settings.to_dict(), "epochs": epochs,
               "best": {"epoch": best["epoch"], "score": best["val"]["score"], "val": best["val"], "release": best_dir}}
    on_rank_zero(rank, atomic_json, os.path.join(run.output_dir, "metrics.json"), summary)
    checkpointer.remove_all()  # the run is complete: nothing to resume
    if rank == 0:
        print(metrics_table(task, epochs, best["epoch"]), flush=True)
        print(f"best: epoch {best['epoch']}, {task.name} val score {best['val']['score']:.4f} -> {best_dir}",
              flush=True)
    torch.distributed.barrier()
    return EXIT_OK
