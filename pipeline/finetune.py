"""`deberta-ds finetune`: fine-tune a release on one SuperGLUE task (or GLUE MNLI) under DeepSpeed.

    deberta-ds finetune --task CB --release DIR --data-dir DIR --output-dir OUT \
        [--deepspeed ds_configs/finetune_zero2_bf16.json] [--lr 3e-6 --epochs 10 ...] [--set key=value ...]

Hyper-parameters: the task's preset (pipeline/presets/superglue.json, `superglue.load_preset`), then
`--preset-overrides FILE.json`, then `--set key=value` (dotted keys reach into "sift"), then the named
options (--lr, --batch-size, ...): the last one wins. The resolved values are printed and kept in
OUT/metrics.json.

Training: AdamW (β, ε, weight decay from the preset: 0.9/0.999, 1e-6, 0.01; no decay on biases and
LayerNorm weights), linear warmup then linear decay to 0, gradient clipping (preset clip_grad_norm) by
DeepSpeed. The DeepSpeed config gives ZeRO stage and precision; this command fills its batch-size and
clipping fields from the settings. A client torch.optim.AdamW is used, so no DeepSpeed op is compiled.

Each epoch ends with an evaluation on the val split; the best epoch (by the task's leaderboard score)
is written as a release directory OUT/best (fp32 master weights, transformers can load it) and the
table of all epochs is printed and written to OUT/metrics.json.

SiFT (pipeline/sift.py): `--sift auto` (default) follows the preset only for the 1.5B model, as in the
paper ("we only apply SiFT to DeBERTa1.5B on SuperGLUE tasks"); `--sift on|off` decides explicitly.
Under ZeRO-3 SiFT's ascent pass, which calls the plain module rather than the engine, still sees whole
parameters: DeepSpeed gathers them in hooks on the module's submodules, not in the engine's forward
(tests/test_finetune_distributed.py: 2 ranks with ZeRO-2 and ZeRO-3 train like one process).

Preemption: on SIGTERM or SIGUSR1 the ranks finish the optimizer step in flight, agree, save a DeepSpeed
checkpoint with the loop's position in OUT/checkpoints and exit 75, as pretraining does; the same command
run again continues from there, with the results of an uninterrupted run (tested bitwise). A checkpoint
written with other settings, data, start or number of ranks is refused; it is removed when the run ends.

Starting from an MNLI-fine-tuned release (`--init-from-mnli DIR`, for RTE, CB, COPA): the encoder and
pooler come from the MNLI model, and each output of the new classifier from the MNLI classifier row
named by the task's `mnli_head_rows` (CB: all three rows; RTE: neutral, entailment; COPA: entailment).

Exit codes: 0 done; 1 bad input (data, release, settings), printed as one line; 75 checkpointed on a
signal (run it again to continue). Under
torch.distributed the process ends with os._exit after a barrier (see DEEPSPEED_NOTES, "exit abort").
"""
import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import torch

from model import CheckpointError, DebertaForMultipleChoice, DebertaForSequenceClassification, load_release, save_release
from pipeline import superglue as sg
from pipeline.launch import LaunchError, apply_runtime_defaults, discover_env, export_env
from pipeline.sift import ASCENT_LOSSES, SiFT
from pipeline.tokenizer import Tokenizer

PROG = "deberta-ds finetune"
# DeepSpeed config fields this command owns: "auto" (or absent) in the file, filled from the settings.
FILLED_DS_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping")
DEFAULT_SEED = 42


class UsageError(ValueError):
    """Settings or options that cannot work together; the message says what to change."""


# ---------------------------------------------------------------- command line
def add_arguments(parser):
    parser.add_argument("--task", required=True,
                        help="task to fine-tune: BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC or MNLI")
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
                        help="DeepSpeed config JSON (default: ds_configs/finetune_zero2_bf16.json with a GPU, "
                        "ds_configs/finetune_cpu.json without)")
    parser.add_argument("--tokenizer", help="sentencepiece model (default: spm.model in the release directory)")
    parser.add_argument("--preset-overrides", metavar="FILE",
                        help="JSON object overlaid on the task's preset (same keys as presets/superglue.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (JSON value; dotted keys for nested ones, e.g. "
                        "sift.vat_lambda=3); repeatable")
    parser.add_argument("--lr", type=float, help="peak learning rate (preset: lr)")
    parser.add_argument("--batch-size", type=int, help="global batch size, all ranks together (preset: batch_size)")
    parser.add_argument("--micro-batch-size", type=int,
                        help="examples per rank per forward (default: batch size / ranks; the rest is gradient "
                        "accumulation)")
    parser.add_argument("--eval-batch-size", type=int, help="examples per forward in evaluation (default: batch size)")
    parser.add_argument("--epochs", type=int, help="training epochs (preset: epochs)")
    parser.add_argument("--warmup-steps", type=int, help="optimizer steps of linear warmup (preset: warmup_steps)")
    parser.add_argument("--cls-drop-out", type=float, help="dropout before the classifier (preset: cls_drop_out)")
    parser.add_argument("--max-seq-len", type=int, help="tokens per sequence, [CLS] and [SEP] included (preset)")
    parser.add_argument("--seed", type=int, help=f"random seed (default {DEFAULT_SEED})")
    parser.add_argument("--sift", choices=("auto", "on", "off"), default="auto",
                        help="SiFT adversarial training: auto (default) = the preset's setting for the 1.5B model, "
                        "off for other sizes; on / off decide explicitly")
    parser.add_argument("--sift-lambda", type=float, help="SiFT weight λ of the adversarial loss (preset: sift.vat_lambda)")
    parser.add_argument("--sift-init", type=float, help="SiFT σ of the initial perturbation (preset: sift.vat_init_perturbation)")
    parser.add_argument("--sift-step", type=float, help="SiFT ascent step size η (preset: sift.vat_learning_rate)")
    parser.add_argument("--sift-loss-fn", choices=sorted(ASCENT_LOSSES), help="loss of the SiFT ascent step (preset: sift.vat_loss_fn)")
    parser.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the weights in the best release (default float32)")
    # The deepspeed launcher passes --local_rank=N; the environment says the same (pipeline.launch).
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args):
    code = 1
    try:
        code = finetune(args)
    except (sg.DataError, CheckpointError, UsageError, LaunchError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
    except KeyError as error:  # unknown task or preset
        print(f"{PROG}: error: {error.args[0] if error.args else error}", file=sys.stderr)
    return end_process(code)


def end_process(code):
    """Under torch.distributed, end deliberately: gloo's teardown at interpreter exit sometimes aborts."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# ---------------------------------------------------------------- settings
def parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_dotted(settings, key, value):
    *parents, leaf = key.split(".")
    node = settings
    for parent in parents:
        node = node.setdefault(parent, {})
        if not isinstance(node, dict):
            raise UsageError(f"--set {key}: {parent!r} is not a group of settings")
    node[leaf] = value


def is_xxlarge(config):
    """The 1.5B model (spec §2.4), the one the paper fine-tuned with SiFT."""
    return config.hidden_size == 1536 and config.num_hidden_layers == 48


def resolve_settings(args, task):
    if task.predicted_by:
        raise UsageError(f"{task.name} has no training data: it is predicted by the {task.predicted_by} model "
                         f"(`deberta-ds predict --task {task.name} --model {task.predicted_by}_RELEASE`)")
    settings = sg.load_preset(task.name)
    settings.setdefault("seed", DEFAULT_SEED)
    if args.preset_overrides:
        with open(args.preset_overrides, encoding="utf-8") as f:
            for key, value in json.load(f).items():
                if isinstance(value, dict) and isinstance(settings.get(key), dict):
                    settings[key].update(value)
                else:
                    settings[key] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        set_dotted(settings, key.strip(), parse_value(value))
    named = {"lr": args.lr, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
             "eval_batch_size": args.eval_batch_size, "epochs": args.epochs, "warmup_steps": args.warmup_steps,
             "cls_drop_out": args.cls_drop_out, "max_seq_len": args.max_seq_len, "seed": args.seed,
             "sift.vat_lambda": args.sift_lambda, "sift.vat_init_perturbation": args.sift_init,
             "sift.vat_learning_rate": args.sift_step, "sift.vat_loss_fn": args.sift_loss_fn}
    for key, value in named.items():
        if value is not None:
            set_dotted(settings, key, value)
    for key in ("lr", "batch_size", "epochs", "warmup_steps", "cls_drop_out", "max_seq_len"):
        if key not in settings:
            raise UsageError(f"setting {key!r} is missing (not in the preset: pass it)")
    return settings


def resolve_sift(mode, settings, config):
    sift = settings.setdefault("sift", {})
    if mode == "auto":
        enabled = bool(sift.get("enabled")) and is_xxlarge(config)
    else:
        enabled = mode == "on"
    sift["enabled"] = enabled
    sift["mode"] = mode
    sift.setdefault("vat_lambda", 5.0)
    sift.setdefault("vat_init_perturbation", 1e-2)
    sift.setdefault("vat_learning_rate", 1e-4)
    sift.setdefault("vat_loss_fn", "symmetric-kl")
    return sift


def batch_layout(settings, world_size):
    """(micro batch per rank, gradient accumulation steps) for the global batch size."""
    batch = int(settings["batch_size"])
    micro = int(settings.get("micro_batch_size") or max(batch // world_size, 1))
    if batch % (micro * world_size):
        raise UsageError(f"batch size {batch} is not a multiple of micro batch {micro} x {world_size} ranks")
    settings["micro_batch_size"] = micro
    settings.setdefault("eval_batch_size", micro)
    return micro, batch // (micro * world_size)


# ---------------------------------------------------------------- DeepSpeed config
def default_ds_config():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    name = "finetune_zero2_bf16.json" if torch.cuda.is_available() else "finetune_cpu.json"
    return os.path.join(root, "ds_configs", name)


def load_ds_config(path, settings, micro, accumulation, world_size, log):
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UsageError(f"{path}: remove the {section!r} section: fine-tuning uses its own AdamW and "
                             "linear schedule (settings from the preset)")
    values = {"train_batch_size": micro * accumulation * world_size, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": accumulation,
              "gradient_clipping": float(settings.get("clip_grad_norm", 1.0))}
    for key, value in values.items():
        if config.get(key, "auto") not in ("auto", value):
            log(f"note: {path}: {key} {config[key]} replaced by {value} (from the fine-tuning settings)")
        config[key] = value
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


# ---------------------------------------------------------------- model
def head_task(task):
    return "multiple_choice" if task.kind == "multiple_choice" else "classification"


def build_model(args, task):
    """The model to fine-tune, from --release, or from the MNLI model with its classifier rows."""
    if args.release:
        return load_release(args.release, task=head_task(task), num_labels=task.num_labels)
    mnli_task = sg.get_task("MNLI")
    if not task.mnli_head_rows:
        raise UsageError(f"{task.name} does not start from MNLI (only RTE, CB, COPA do): use --release")
    mnli = load_release(args.init_from_mnli, task="classification", num_labels=mnli_task.num_labels)
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
    return model


def set_cls_dropout(model, value):
    model.dropout.p = float(value)
    model.config = model.config.replace(cls_dropout=float(value))  # recorded in the saved release


def tokenizer_path(args):
    path = args.tokenizer or os.path.join(args.release or args.init_from_mnli, "spm.model")
    if not os.path.isfile(path):
        raise UsageError(f"no tokenizer at {path}: pass --tokenizer SPM_MODEL")
    return path


# ---------------------------------------------------------------- optimisation
def parameter_groups(model, weight_decay):
    """Weight decay on weights only: biases and LayerNorm weights are not decayed (as the official code)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(warmup_steps, total_steps):
    """LR factor: linear 0 -> 1 over the warmup, then linear 1 -> 0 at the last step."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


# ---------------------------------------------------------------- data
def epoch_micro_batches(num_features, settings, epoch, rank, world_size):
    """This rank's micro-batches (feature index lists) of one epoch.

    Every rank walks the same shuffled order (seed + epoch), padded by wrapping around to whole global
    batches, so all ranks make the same number of forward/backward calls (ZeRO's collectives need it).
    """
    batch, micro = int(settings["batch_size"]), int(settings["micro_batch_size"])
    generator = torch.Generator().manual_seed(int(settings["seed"]) + epoch)
    order = torch.randperm(num_features, generator=generator).tolist()
    steps = math.ceil(num_features / batch)
    order = (order * math.ceil(steps * batch / num_features))[:steps * batch]
    pieces = [order[i:i + micro] for i in range(0, len(order), micro)]
    return pieces[rank::world_size], steps


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------- evaluation
def predict_logits(forward, features, batch_size, device, rank=0, world_size=1):
    """Logits of all features in feature order, each rank computing every world_size-th batch.

    Ranks with one batch fewer repeat their last batch (discarded), so all ranks run the same number
    of forwards (ZeRO-3 gathers parameters collectively in each)."""
    batches = [features[i:i + batch_size] for i in range(0, len(features), batch_size)]
    mine = list(range(rank, len(batches), world_size))
    rounds = math.ceil(len(batches) / world_size)
    results = {}
    with torch.no_grad():
        for turn in range(rounds):
            index = mine[min(turn, len(mine) - 1)] if mine else 0
            logits = forward(**to_device(sg.collate(batches[index]), device)).logits
            if turn < len(mine):
                results[index] = logits.float().cpu().numpy()
    if world_size > 1:
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    return np.concatenate([results[i] for i in range(len(batches))])


def evaluate(engine, task, examples, features, settings, rank, world_size):
    engine.eval()
    logits = predict_logits(engine, features, int(settings["eval_batch_size"]), engine.device, rank, world_size)
    engine.train()
    predictions = task.decode(examples, features, logits)
    return task.score(examples, predictions)


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


def save_best(engine, out_dir, spm_path, dtype, rank):
    tensors = full_fp32_tensors(engine.module)
    if rank == 0:
        save_release(engine.module, out_dir, spm_path=spm_path, dtype=getattr(torch, dtype), tensors=tensors,
                     config=engine.module.config)


def write_json_atomic(path, value):
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".metrics.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(temporary, path)


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
              "data_dir": args.data_dir, "settings": settings, "world_size": world_size}
    return json.loads(json.dumps(values, default=str))


def resume_position(engine, ckpt_dir, identity, rank):
    """The loop position saved in ckpt_dir ({} if none), after loading the engine, optimizer, schedule and
    every rank's RNG states from it."""
    from pipeline import checkpoint
    tag, meta = checkpoint.latest(ckpt_dir)
    if tag is None:
        return {}
    saved = meta.get("run", {})
    differs = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if differs:
        raise UsageError(f"{os.path.join(ckpt_dir, tag)}: saved by a run with another {', '.join(differs)}; "
                         f"remove {ckpt_dir} to start again, or use another --output-dir")
    try:
        return checkpoint.load(engine, ckpt_dir, tag, rank)
    except checkpoint.ResumeError as error:
        raise UsageError(str(error)) from None


def save_position(engine, ckpt_dir, step, position, identity, rank):
    from pipeline import checkpoint
    checkpoint.save(engine, ckpt_dir, step, position, {"run": identity}, keep_last=1, rank=rank)


def signal_for_tests(step, rank):
    """DEBERTA_DS_FAULT_SIGNAL_AT_STEPS=5,8: rank 0 sends itself SIGUSR1 after those optimizer steps."""
    steps = os.environ.get("DEBERTA_DS_FAULT_SIGNAL_AT_STEPS", "")
    if rank == 0 and str(step) in steps.split(","):
        os.kill(os.getpid(), signal.SIGUSR1)


# ---------------------------------------------------------------- the run
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mean_across_ranks(values, world_size):
    tensor = torch.tensor(values, dtype=torch.float64)
    if world_size > 1:
        torch.distributed.all_reduce(tensor)
        tensor /= world_size
    return tensor.tolist()


def finetune(args):
    task = sg.get_task(args.task)
    env = discover_env()
    rank, world_size = env.rank, env.world_size
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    settings = resolve_settings(args, task)
    micro, accumulation = batch_layout(settings, world_size)
    ds_path = args.deepspeed or default_ds_config()
    ds_config = load_ds_config(ds_path, settings, micro, accumulation, world_size, log)
    if settings.get("start_from") == "MNLI" and not args.init_from_mnli:
        log(f"note: the {task.name} preset starts from the MNLI-fine-tuned model; this run starts from "
            f"{args.release} (pass --init-from-mnli DIR to follow the preset)")

    # Everything that can fail on bad input happens before the process group exists.
    spm_path = tokenizer_path(args)
    tokenizer = Tokenizer(spm_path)
    max_seq_len = int(settings["max_seq_len"])
    train_examples = task.load("train", args.data_dir)
    val_examples = task.load("val", args.data_dir)
    train_features = task.build_features(train_examples, tokenizer, max_seq_len)
    val_features = task.build_features(val_examples, tokenizer, max_seq_len)
    seed_everything(int(settings["seed"]))
    model = build_model(args, task)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"tokenizer {spm_path} has {tokenizer.vocab_size} ids, the model's vocabulary "
                         f"only {model.config.vocab_size}")
    set_cls_dropout(model, settings["cls_drop_out"])
    sift_settings = resolve_sift(args.sift, settings, model.config)
    os.makedirs(args.output_dir, exist_ok=True)

    import deepspeed  # imported late: `--help` and input errors stay fast

    export_env(env)
    apply_runtime_defaults(env)
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)
    steps_per_epoch = math.ceil(len(train_features) / int(settings["batch_size"]))
    total_steps = steps_per_epoch * int(settings["epochs"])
    optimizer = torch.optim.AdamW(parameter_groups(model, float(settings.get("weight_decay", 0.01))),
                                  lr=float(settings["lr"]), betas=tuple(settings.get("adam_betas", (0.9, 0.999))),
                                  eps=float(settings.get("adam_eps", 1e-6)))
    schedule = linear_schedule(int(settings["warmup_steps"]), total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    lambda_ = float(sift_settings["vat_lambda"]) if sift_settings["enabled"] else 0.0
    sift = SiFT(engine.module, lambda_=lambda_, init=float(sift_settings["vat_init_perturbation"]),
                step=float(sift_settings["vat_learning_rate"]), ascent_loss=sift_settings["vat_loss_fn"])

    log(f"{task.name}: {len(train_examples)} train / {len(val_examples)} val examples, {world_size} rank(s), "
        f"{total_steps} steps; DeepSpeed config {ds_path}")
    log("settings: " + json.dumps(settings, sort_keys=True))
    log(f"SiFT: {'on, λ=' + str(lambda_) if sift.enabled else 'off'}")

    from pipeline.pretrain import EXIT_REQUEUE, StopFlag, agree
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
    for epoch in range(start_epoch, int(settings["epochs"]) + 1):
        engine.train()
        micro_batches, _ = epoch_micro_batches(len(train_features), settings, epoch, rank, world_size)
        resuming = epoch == start_epoch and position
        sums = np.array(position["sums"][rank]) if resuming else np.zeros(3)
        for index in range(start_batch if resuming else 0, len(micro_batches)):
            batch = to_device(sg.collate([train_features[i] for i in micro_batches[index]]), engine.device)
            out = sift.loss(batch, forward=engine)
            engine.backward(out.loss)
            engine.step()
            adv = 0.0 if out.adv_loss is None else out.adv_loss.item()
            sums += [out.loss.item(), out.task_loss.item(), adv]
            if (index + 1) % accumulation:
                continue  # a checkpoint only between optimizer steps
            step = (epoch - 1) * steps_per_epoch + (index + 1) // accumulation
            signal_for_tests(step, rank)
            if agree(stop.raised is not None, engine.device):
                # DeepSpeed keeps rank 0's client state: every rank's loss sums go into it
                all_sums = [None] * world_size
                torch.distributed.all_gather_object(all_sums, sums.tolist())
                save_position(engine, ckpt_dir, step, {"epoch": epoch, "batch": index + 1, "sums": all_sums,
                                                       "epochs": epochs, "best": best,
                                                       "elapsed_s": time.time() - started}, identity, rank)
                log(f"stopping on {stop.raised or 'a signal on another rank'} after optimizer step {step} "
                    f"(epoch {epoch}): checkpoint saved in {ckpt_dir}; exit {EXIT_REQUEUE} (run again to resume)")
                return EXIT_REQUEUE
        train_loss, task_loss, adv_loss = mean_across_ranks((sums / max(len(micro_batches), 1)).tolist(), world_size)
        scores = evaluate(engine, task, val_examples, val_features, settings, rank, world_size)
        record = {"epoch": epoch, "step": epoch * steps_per_epoch, "lr": engine.get_lr()[0],
                  "train_loss": train_loss, "task_loss": task_loss,
                  "adv_loss": adv_loss if sift.enabled else None, "val": scores,
                  "elapsed_s": round(time.time() - started, 1)}
        epochs.append(record)
        improved = best is None or scores["score"] > best["val"]["score"]
        if improved:
            best = record
            save_best(engine, best_dir, spm_path, args.save_dtype, rank)
        log(f"epoch {epoch}: train loss {train_loss:.4f} (task {task_loss:.4f}"
            + (f", adv {adv_loss:.4f}" if sift.enabled else "") + "), val "
            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + (" (best, saved)" if improved else ""))

    summary = {"task": task.name, "start": args.release or args.init_from_mnli,
               "start_kind": "release" if args.release else "mnli", "data_dir": args.data_dir,
               "deepspeed_config": ds_path, "world_size": world_size, "settings": settings,
               "epochs": epochs, "best": {"epoch": best["epoch"], "score": best["val"]["score"],
                                          "val": best["val"], "release": best_dir}}
    if rank == 0:
        write_json_atomic(os.path.join(args.output_dir, "metrics.json"), summary)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is complete: nothing to resume
        print(metrics_table(task, epochs, best["epoch"]), flush=True)
        print(f"best: epoch {best['epoch']}, {task.name} val score {best['val']['score']:.4f} -> {best_dir}",
              flush=True)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog=PROG)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
