"""What a fine-tuning run leaves: the best epoch as a release (OUT/best), the table of every epoch, and
OUT/metrics.json."""
import torch


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
    from pipeline.finetune.start import release_labels
    from pipeline.release import save_release
    from pipeline.run.lifecycle import on_rank_zero
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
