"""The model a fine-tuning run starts from: a release (pretrained or fine-tuned), or an MNLI-fine-tuned release
whose classifier rows the task names; the head's dropout and what a fine-tuned release's config.json says."""
import torch

from pipeline.errors import ConfigError


def is_xxlarge(config):
    """The 1.5B model (spec §2.4), the one the paper fine-tuned with SiFT."""
    return config.hidden_size == 1536 and config.num_hidden_layers == 48


def resolve_sift(settings, model_config):
    """Whether SiFT runs: --sift on/off decides; auto follows the preset for the 1.5B model only."""
    sift = settings.sift
    sift.enabled = (sift.enabled and is_xxlarge(model_config)) if sift.mode == "auto" else sift.mode == "on"
    return sift


def head_task(task):
    """The release reader's name of the head a task trains (pipeline/release/read.py TASKS)."""
    return task.kind if task.kind in ("multiple_choice", "entity_scoring") else "classification"


def build_model(run, task, attention_impl=None, partitioned=False):
    """The model to fine-tune, from run.release, or from the MNLI model (run.init_from_mnli) with its rows, with
    the fast pieces applied (model/fast/convert.py; partitioned: ZeRO-3 will gather each weight per module)."""
    from model import DebertaForMultipleChoice, DebertaForSequenceClassification
    from model.fast import convert
    from pipeline.finetune.tasks import get_task
    from pipeline.release import load_release
    if run.release:
        return load_release(run.release, task=head_task(task), num_labels=task.num_labels, attention_impl=attention_impl,
                            partitioned=partitioned)
    mnli_task = get_task("MNLI")
    if not task.mnli_head_rows:
        raise ConfigError(f"{task.name} does not start from MNLI (only RTE, CB, COPA do): use --release")
    mnli = load_release(run.init_from_mnli, task="classification", num_labels=mnli_task.num_labels,
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


def check_length(config, max_seq_len, release):
    """Refuse a max_seq_len the model cannot read: only a model that adds absolute positions to its input
    (position_biased_input) has a length limit, its table. DeBERTa-v2/v3 releases have none and take any length
    (relative positions; a 512-token model's log buckets saturate beyond 512: README, long inputs)."""
    if config.position_biased_input and max_seq_len > config.max_position_embeddings:
        raise ConfigError(f"max_seq_len {max_seq_len} is longer than {release}'s absolute positions "
                          f"(max_position_embeddings {config.max_position_embeddings}, added to its input): use "
                          f"--max-seq-len {config.max_position_embeddings} or less")


def set_cls_dropout(model, value):
    model.dropout.p = float(value)
    model.config = model.config.replace(cls_dropout=float(value))  # recorded in the saved release


def release_labels(task):
    """What a fine-tuned release's config.json says about its head: the task, and its labels (transformers'
    id2label/label2id) where the head has one output per label."""
    values = {"finetuning_task": task.name}
    if task.kind not in ("multiple_choice", "entity_scoring"):
        values["id2label"] = {str(i): name for i, name in enumerate(task.label_names)}
        values["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    return values
