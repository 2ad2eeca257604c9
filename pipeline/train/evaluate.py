"""Held-out evaluation during pretraining: the training loss over the first `eval_steps` global batches of
the validation shards (`valid_data_dir`), every `eval_interval` steps and at the last step; in mode zero3 also
the MLM accuracy (objective rtd: the generator's MLM and the discriminator's RTD loss and accuracy as well).

Every evaluation reads the validation loader from position 0: the same samples (epoch 0 of its seeded
order) with the same masks (a function of seed and sample id), so successive evaluations are comparable
and the result does not depend on the number of ranks. The loss is the mean of the micro-batch losses,
which is what DeepSpeed's pipeline engine reports (`eval_batch`), in both modes.
"""
import time

from pipeline.errors import DataError


def build_valid_loader(run, tokenizer, dp_rank, dp_size, seq_len):
    """This rank's validation loader, or None without `valid_data_dir`. Refuses a validation set with
    another sequence length than training's, or too small for one evaluation."""
    if not run.valid_data_dir:
        return None
    from pipeline.data.mlm_loader import build_pretrain_loader
    loader = build_pretrain_loader(run.valid_data_dir, tokenizer, run.micro_batch_size, dp_rank, dp_size, run.seed,
                                   masking=run.objective)
    if loader.max_seq_len != seq_len:
        raise DataError(f"{run.valid_data_dir}: validation shards of {loader.max_seq_len} tokens, training "
                        f"shards of {seq_len}; preprocess both with the same --max-seq-len")
    needed = run.eval_steps * run.global_batch_size
    if len(loader.data) < needed:
        raise DataError(f"{run.valid_data_dir}: {len(loader.data)} validation samples, fewer than eval_steps x "
                        f"global_batch_size = {run.eval_steps} x {run.global_batch_size}; lower eval_steps")
    return loader


def due(run, step):
    return step % run.eval_interval == 0 or step == run.max_steps


def evaluate(stepper, loader, run):
    """{"val_loss", "val_mlm_accuracy" (None in pipeline mode), rtd's val_* values, "eval_time_s"}, the same
    on every rank."""
    start = time.time()
    loader.consumed_samples = 0
    values = stepper.eval_loss(stepper.batches(loader), run.eval_steps)
    return dict(values, eval_time_s=time.time() - start)
