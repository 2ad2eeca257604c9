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
(pipeline/optim.py), gradient clipping (clip_grad_norm) by DeepSpeed. The DeepSpeed config gives the ZeRO
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

Exit codes: 0 done; 1 bad input (data, release, settings), one line; 2 usage; 75 checkpointed on a signal.
"""
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch

from pipeline.cli_types import at_least, positive_float, positive_int
from pipeline.errors import ConfigError

TASK_NAMES = "BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC or MNLI"


# ---------------------------------------------------------------- command line
def add_arguments(parser):
    from model.config import ATTENTION_IMPLS
    from pipeline.finetune.config import ASCENT_LOSS_NAMES
    parser.add_argument("--task", required=True, help=f"task to fine-tune: {TASK_NAMES}")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--release", help="release directory to start from (pretrained or fine-tuned)")
    start.add_argument("--init-from-mnli", metavar="DIR",
                       help="start from this MNLI-fine-tuned release: its encoder and pooler, and the new "
                       "classifier rows copied from the MNLI rows the task names (RTE, CB, COPA)")
    parser.add_argument("--data-dir", help="official SuperGLUE layout DIR/<Task>/{train,val}.jsonl (MNLI: GLUE "
                        "TSVs); without it the data come from `datasets`")
    parser.add_argument("--output-dir", required=True,
                        help="where metrics.json and the best release (OUT/best) go; after SIGTERM/SIGUSR1 (exit "
                        "75) also OUT/checkpoints, from which the same command continues")
    parser.add_argument("--deepspeed", default=None,
                        help="DeepSpeed config: a JSON file or a shipped name (default: finetune_zero2_bf16 with a "
                        "GPU, finetune_cpu without; also finetune_cpu_zero3)")
    parser.add_argument("--tokenizer", help="sentencepiece model (default: spm.model in the release directory)")
    parser.add_argument("--preset-overrides", metavar="FILE",
                        help="JSON object overlaid on the task's preset (same keys as presets/superglue.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (JSON value; dotted keys for nested ones, e.g. "
                        "sift.vat_lambda=3); repeatable")
    parser.add_argument("--lr", type=positive_float, help="peak learning rate (preset: lr)")
    parser.add_argument("--batch-size", type=positive_int, help="global batch size, all ranks together (preset: batch_size)")
    parser.add_argument("--micro-batch-size", type=positive_int,
                        help="examples per rank per forward (default: batch size / ranks; the rest is gradient "
                        "accumulation)")
    parser.add_argument("--eval-batch-size", type=positive_int, help="examples per forward in evaluation (default: the micro-batch size)")
    parser.add_argument("--epochs", type=positive_int, help="training epochs (preset: epochs)")
    parser.add_argument("--warmup-steps", type=at_least(0), help="optimizer steps of linear warmup (preset: warmup_steps)")
    parser.add_argument("--cls-drop-out", type=float, help="dropout before the classifier (preset: cls_drop_out)")
    parser.add_argument("--max-seq-len", type=at_least(4), help="tokens per sequence, [CLS] and [SEP] included (preset)")
    parser.add_argument("--seed", type=int, help="random seed (default 42)")
    parser.add_argument("--attention-impl", choices=ATTENTION_IMPLS,
                        help="attention implementation (default: the release's; model/attention.py)")
    parser.add_argument("--sift", choices=("auto", "on", "off"), default="auto",
                        help="SiFT adversarial training: auto (default) = the preset's setting for the 1.5B model, "
                        "off for other sizes; on / off decide explicitly")
    parser.add_argument("--sift-lambda", type=float, help="SiFT weight λ of the adversarial loss (preset: sift.vat_lambda)")
    parser.add_argument("--sift-init", type=float, help="SiFT σ of the initial perturbation (preset: sift.vat_init_perturbation)")
    parser.add_argument("--sift-step", type=float, help="SiFT ascent step size η (preset: sift.vat_learning_rate)")
    parser.add_argument("--sift-loss-fn", choices=ASCENT_LOSS_NAMES, help="loss of the SiFT ascent step (preset: sift.vat_loss_fn)")
    parser.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the weights in the best release (default float32)")


def run(args):
    from pipeline.lifecycle import run_and_finish
    return run_and_finish(finetune, args)


# ---------------------------------------------------------------- settings
def is_xxlarge(config):
    """The 1.5B model (spec §2.4), the one the paper fine-tuned with SiFT."""
    return config.hidden_size == 1536 and config.num_hidden_layers == 48


def resolve_settings(args, task):
    from pipeline.finetune import config
    if task.predicted_by:
        raise ConfigError(f"{task.name} has no training data: it is predicted by the {task.predicted_by} model "
                          f"(`deberta-ds predict --task {task.name} --model {task.predicted_by}_RELEASE`)")
    named = {"lr": args.lr, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
             "eval_batch_size": args.eval_batch_size, "epochs": args.epochs, "warmup_steps": args.warmup_steps,
             "cls_drop_out": args.cls_drop_out, "max_seq_len": args.max_seq_len, "seed": args.seed,
             "attention_impl": args.attention_impl, "sift.vat_lambda": args.sift_lambda,
             "sift.vat_init_perturbation": args.sift_init, "sift.vat_learning_rate": args.sift_step,
             "sift.vat_loss_fn": args.sift_loss_fn, "sift.mode": args.sift}
    return config.resolve(task.name, args.preset_overrides, args.set, named)


def resolve_sift(settings, model_config):
    """Whether SiFT runs: --sift on/off decides; auto follows the preset for the 1.5B model only."""
    sift = settings.sift
    sift.enabled = (sift.enabled and is_xxlarge(model_config)) if sift.mode == "auto" else sift.mode == "on"
    return sift


def batch_layout(settings, world_size):
    """(micro batch per rank, gradient accumulation steps) for the global batch size."""
    from pipeline.ds_config import batch_fields
    micro = settings.micro_batch_size or max(settings.batch_size // world_size, 1)
    fields = batch_fields(settings.batch_size, micro, world_size, names=("batch_size", "micro_batch_size"))
    settings.micro_batch_size = micro
    settings.eval_batch_size = settings.eval_batch_size or micro
    return micro, fields


def ds_config_for(args, settings, fields):
    """The DeepSpeed config (by path or shipped name) completed with the batch sizes and the clipping."""
    from pipeline.ds_config import complete_ds_config, load_ds_config
    name = args.deepspeed or ("finetune_zero2_bf16" if torch.cuda.is_available() else "finetune_cpu")
    ds, path = load_ds_config(name)
    ds = complete_ds_config(ds, dict(fields, gradient_clipping=float(settings.clip_grad_norm)), path,
                            "the fine-tuning settings")
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds, path


# ---------------------------------------------------------------- model
def head_task(task):
    """The release reader's name of the head a task trains (pipeline/release/read.py TASKS)."""
    return task.kind if task.kind in ("multiple_choice", "entity_scoring") else "classification"


def build_model(args, task, attention_impl=None, partitioned=False):
    """The model to fine-tune, from --release, or from the MNLI model with its classifier rows, with the fast
    pieces applied (model/fast/convert.py; partitioned: ZeRO-3 will gather each weight per module)."""
    from model import DebertaForMultipleChoice, DebertaForSequenceClassification
    from model.fast import convert
    from pipeline.finetune.tasks import get_task
    from pipeline.release import load_release
    if args.release:
        return load_release(args.release, task=head_task(task), num_labels=task.num_labels, attention_impl=attention_impl,
                            partitioned=partitioned)
    mnli_task = get_task("MNLI")
    if not task.mnli_head_rows:
        raise ConfigError(f"{task.name} does not start from MNLI (only RTE, CB, COPA do): use --release")
    mnli = load_release(args.init_from_mnli, task="classification", num_labels=mnli_task.num_labels,
                        attention_impl=attention_impl)
    if task.kind == "multiple_choice":
        model = DebertaForMultipleChoice(mnli.config)
    else:
        model = DebertaForSequenceClassification(mnli.config, num_labels=task.num_labels)
    model.deberta.load_state_dict(mnli.deberta.state_dict())
    model.pooler.load_state_dict(mnli.pooler.state_dict())
    rows = [mnli_task.label_names.index(name) for name in task.mnli_head_rows]
    with torch.no_grad():
        model.classifier.weight.copy_(mnli.classifier.weight[rows])
        model.classifier.bias.copy_(mnli.classifier.bias[rows])
    return convert.apply(model, mnli.config.attention_impl, fuse_qkv=not partitioned, autocast_linear=not partitioned)


def set_cls_dropout(model, value):
    model.dropout.p = float(value)
    model.config = model.config.replace(cls_dropout=float(value))  # recorded in the saved release


def tokenizer_path(args):
    path = args.tokenizer or os.path.join(args.release or args.init_from_mnli, "spm.model")
    if not os.path.isfile(path):
        raise ConfigError(f"no tokenizer at {path}: pass --tokenizer SPM_MODEL")
    return path


def release_labels(task):
    """What a fine-tuned release's config.json says about its head: the task, and its labels (transformers'
    id2label/label2id) where the head has one output per label."""
    values = {"finetuning_task": task.name}
    if task.kind not in ("multiple_choice", "entity_scoring"):
        values["id2label"] = {str(i): name for i, name in enumerate(task.label_names)}
        values["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    return values


# ---------------------------------------------------------------- saving
def full_fp32_tensors(module):
    """(release key, fp32 tensor) of the whole model: DeepSpeed's fp32 master weights where it keeps
    them (bf16/fp16, ZeRO 1-3: a collective under ZeRO-3, so every rank calls this), else the weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(module.named_parameters())
    tensors = []
    for key, value in module.state_dict().items():
        full = safe_get_full_fp32_param(params[key]) if key in params else None
        tensors.append((key, (value if full is None else full).detach().float().cpu()))
    return tensors


def save_best(engine, task, out_dir, spm_path, dtype, rank):
    from pipeline.release import save_release
    from pipeline.lifecycle import on_rank_zero
    tensors = full_fp32_tensors(engine.module)  # a collective under ZeRO-3: every rank takes part
    on_rank_zero(rank, lambda: save_release(engine.module, out_dir, spm_path=spm_path, dtype=getattr(torch, dtype),
                                            tensors=tensors, extra_config=release_labels(task), overwrite=True))


def metrics_table(task, epochs, best_epoch):
    metric_names = [k for k in epochs[0]["val"] if k != "score"] + ["score"]
    header = ["epoch", "step", "train_loss", "task_loss", "adv_loss"] + metric_names + ["best"]
    rows = []
    for record in epochs:
        adv = "-" if record["adv_loss"] is None else f"{record['adv_loss']:.4f}"
        rows.append([str(record["epoch"]), str(record["step"]), f"{record['train_loss']:.4f}",
                     f"{record['task_loss']:.4f}", adv] + [f"{record['val'][m]:.4f}" for m in metric_names]
                    + ["*" if record["epoch"] == best_epoch else ""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"{task.name} (val)", line(header), separator] + [line(r) for r in rows])


# ---------------------------------------------------------------- preemption
def run_identity(task, args, settings, world_size):
    """What a resumed run must share with the run that saved: as JSON would give it back."""
    values = {"task": task.name, "release": args.release, "init_from_mnli": args.init_from_mnli,
              "data_dir": args.data_dir, "settings": settings.to_dict(), "world_size": world_size}
    return json.loads(json.dumps(values, default=str))


def resume_position(engine, ckpt_dir, identity, rank):
    """The loop position saved in ckpt_dir ({} if none), after loading the engine, optimizer, schedule and
    every rank's RNG states from it."""
    from pipeline.train import checkpoint
    tag, meta = checkpoint.resume_point(ckpt_dir, rank)
    if tag is None:
        return {}
    saved = meta.get("run", {})
    differs = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if differs:
        raise ConfigError(f"{os.path.join(ckpt_dir, tag)}: saved by a run with another {', '.join(differs)}; "
                          f"remove {ckpt_dir} to start again, or use another --output-dir")
    return checkpoint.load(checkpoint.SingleEngine(engine), ckpt_dir, tag, rank)


def save_position(engine, ckpt_dir, step, position, identity, rank):
    from pipeline.train import checkpoint
    checkpoint.save(checkpoint.SingleEngine(engine), ckpt_dir, step, position, {"run": identity}, keep_last=1,
                    rank=rank)


# ---------------------------------------------------------------- the run
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finetune(args):
    from pipeline.data.tokenizer import Tokenizer
    from pipeline.finetune.batches import epoch_micro_batches, feature_length, padding_fraction
    from pipeline.finetune.features import collate
    from pipeline.finetune.inference import evaluate, to_device
    from pipeline.finetune.sift import SiFT
    from pipeline.finetune.tasks import get_task
    from pipeline.ds_config import zero_stage
    from pipeline.io import atomic_json, make_dirs
    from pipeline.launch.env import discover_env
    from pipeline.lifecycle import EXIT_OK, EXIT_REQUEUE, StopFlag, any_rank, inject_fault, lock_run_directory, mean_over_ranks, \
        on_rank_zero
    from pipeline.optim import build_optimizer, lr_schedule

    task = get_task(args.task)
    env = discover_env()
    rank, world_size = env.rank, env.world_size
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    settings = resolve_settings(args, task)
    micro, fields = batch_layout(settings, world_size)
    accumulation = fields["gradient_accumulation_steps"]
    ds_config, ds_path = ds_config_for(args, settings, fields)
    if settings.start_from == "MNLI" and not args.init_from_mnli:
        log(f"note: the {task.name} preset starts from the MNLI-fine-tuned model; this run starts from "
            f"{args.release} (pass --init-from-mnli DIR to follow the preset)")

    # Everything that can fail on bad input happens before the process group exists.
    spm_path = tokenizer_path(args)
    tokenizer = Tokenizer(spm_path)
    train_examples = task.load("train", args.data_dir)
    val_examples = task.load("val", args.data_dir)
    train_features = task.build_features(train_examples, tokenizer, settings.max_seq_len)
    val_features = task.build_features(val_examples, tokenizer, settings.max_seq_len)
    train_lengths = [feature_length(f) for f in train_features]
    seed_everything(settings.seed)
    model = build_model(args, task, settings.attention_impl, partitioned=zero_stage(ds_config) == 3)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {spm_path} has {tokenizer.vocab_size} ids, the model's vocabulary "
                          f"only {model.config.vocab_size}")
    set_cls_dropout(model, settings.cls_drop_out)
    sift_settings = resolve_sift(settings, model.config)
    make_dirs(args.output_dir, "output directory")

    from pipeline.launch.env import setup_distributed
    import deepspeed  # imported late: `--help` and input errors stay fast
    setup_distributed()
    lock_run_directory(args.output_dir, rank, "fine-tuning run")
    steps_per_epoch = math.ceil(len(train_features) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    optimizer = build_optimizer(model, settings.lr, settings.adam_betas, settings.adam_eps, settings.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: lr_schedule(opt, settings.warmup_steps, total_steps))
    lambda_ = sift_settings.vat_lambda if sift_settings.enabled else 0.0
    sift = SiFT(engine.module, lambda_=lambda_, init=sift_settings.vat_init_perturbation,
                step=sift_settings.vat_learning_rate, ascent_loss=sift_settings.vat_loss_fn)

    log(f"{task.name}: {len(train_examples)} train / {len(val_examples)} val examples ({len(train_features)} / "
        f"{len(val_features)} sequences), {world_size} rank(s), {total_steps} steps; DeepSpeed config {ds_path}")
    log("settings: " + json.dumps(settings.to_dict(), sort_keys=True))
    log(f"SiFT: {'on, λ=' + str(lambda_) if sift.enabled else 'off'}")

    stop = StopFlag()
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    identity = run_identity(task, args, settings, world_size)
    position = resume_position(engine, ckpt_dir, identity, rank)
    epochs, best = position.get("epochs", []), position.get("best")
    start_epoch, start_batch = position.get("epoch", 1), position.get("batch", 0)
    if position:
        log(f"resumed from {ckpt_dir} at epoch {start_epoch}, optimizer step {position['step']}")
    best_dir = os.path.join(args.output_dir, "best")
    started = time.time() - position.get("elapsed_s", 0.0)
    for epoch in range(start_epoch, settings.epochs + 1):
        engine.train()
        micro_batches, _, every_rank = epoch_micro_batches(train_lengths, settings, epoch, rank, world_size)
        padding = padding_fraction([[train_features[i] for i in piece] for piece in every_rank])
        resuming = epoch == start_epoch and position
        epoch_started = time.time()
        sums = np.array(position["sums"][rank]) if resuming else np.zeros(3)
        for index in range(start_batch if resuming else 0, len(micro_batches)):
            batch = to_device(collate([train_features[i] for i in micro_batches[index]]), engine.device)
            out = sift.loss(batch, forward=engine)
            engine.backward(out.loss)
            engine.step()
            adv = 0.0 if out.adv_loss is None else out.adv_loss.item()
            sums += [out.loss.item(), out.task_loss.item(), adv]
            if (index + 1) % accumulation:
                continue  # a checkpoint only between optimizer steps
            step = (epoch - 1) * steps_per_epoch + (index + 1) // accumulation
            inject_fault(step, rank)
            if any_rank(stop.raised is not None, engine.device):
                # DeepSpeed keeps rank 0's client state: every rank's loss sums go into it
                all_sums = [None] * world_size
                torch.distributed.all_gather_object(all_sums, sums.tolist())
                save_position(engine, ckpt_dir, step, {"epoch": epoch, "batch": index + 1, "sums": all_sums,
                                                       "epochs": epochs, "best": best,
                                                       "elapsed_s": time.time() - started}, identity, rank)
                log(f"stopping on {stop.raised or 'a signal on another rank'} after optimizer step {step} "
                    f"(epoch {epoch}): checkpoint saved in {ckpt_dir}; exit {EXIT_REQUEUE} (run again to resume)")
                return EXIT_REQUEUE
        train_loss, task_loss, adv_loss = mean_over_ranks((sums / max(len(micro_batches), 1)).tolist(), engine.device)
        train_s = time.time() - epoch_started   # this epoch's training (after a resume: since the resume)
        scores = evaluate(engine, task, val_examples, val_features, settings.eval_batch_size, rank, world_size)
        record = {"epoch": epoch, "step": epoch * steps_per_epoch, "lr": engine.get_lr()[0],
                  "train_loss": train_loss, "task_loss": task_loss,
                  "adv_loss": adv_loss if sift.enabled else None, "val": scores,
                  "padding_fraction": round(padding, 4), "train_s": round(train_s, 2),
                  "elapsed_s": round(time.time() - started, 1)}
        epochs.append(record)
        improved = best is None or scores["score"] > best["val"]["score"]
        if improved:
            best = record
            save_best(engine, task, best_dir, spm_path, args.save_dtype, rank)
        log(f"epoch {epoch}: train loss {train_loss:.4f} (task {task_loss:.4f}"
            + (f", adv {adv_loss:.4f}" if sift.enabled else "") + f"), padding {padding:.1%}, {train_s:.1f} s, val "
            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + (" (best, saved)" if improved else ""))

    summary = {"task": task.name, "start": args.release or args.init_from_mnli,
               "start_kind": "release" if args.release else "mnli", "data_dir": args.data_dir,
               "deepspeed_config": ds_path, "world_size": world_size, "settings": settings.to_dict(),
               "epochs": epochs, "best": {"epoch": best["epoch"], "score": best["val"]["score"],
                                          "val": best["val"], "release": best_dir}}
    on_rank_zero(rank, atomic_json, os.path.join(args.output_dir, "metrics.json"), summary)
    if rank == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is complete: nothing to resume
        print(metrics_table(task, epochs, best["epoch"]), flush=True)
        print(f"best: epoch {best['epoch']}, {task.name} val score {best['val']['score']:.4f} -> {best_dir}",
              flush=True)
    torch.distributed.barrier()
    return EXIT_OK
