"""What a pretraining checkpoint must share with the run that resumes it, and what the run may change.

A checkpoint's meta file records the model (config(s), mode, objective, embedding sharing), the data (tokenizer,
shards, samples, sequence length, validation set), the run config, the ZeRO stage and the precision.
- Another model, mode or objective is refused naming both (check_compatible).
- Another tokenizer is refused; other shards only with --accept-data-change (check_same_data).
- Run settings (check_run_changes): the schedule's settings (lr, discriminator_lr, warmup_steps, max_steps,
  weight_decay, rtd_lambda) are applied from the new run config, announced and recorded in the checkpoint's
  `changes`; settings that only steer the run (intervals, paths, micro-batch, recomputation) follow the new
  config silently; the rest (seed, global batch, Adam's betas and eps, the optimizer, emd) are refused with
  the way to change them: a new run from a release.
- Another ZeRO stage (but for ZeRO-1 <-> ZeRO-2) or precision is refused the same way (check_engine_changes).
"""
from pipeline.errors import CheckpointError
from pipeline.run.checkpointer import META

APPLIED = ("lr", "discriminator_lr", "warmup_steps", "max_steps", "weight_decay", "rtd_lambda")
STEERING = ("output_dir", "data_dir", "valid_data_dir", "tokenizer", "save_interval", "keep_last", "eval_interval",
            "eval_steps", "log_interval", "peak_tflops", "max_nonfinite_steps", "activation_checkpointing",
            "zero3_leaf_layers", "micro_batch_size", "init_from_release", "sequence_parallel_size")
# compared by check_compatible (the model config they give) or by the universal conversion (pipeline_stages)
CHECKED_ELSEWHERE = ("model", "model_overrides", "mode", "objective", "generator_layers", "embedding_sharing",
                     "rtd_training", "pipeline_stages")


def model_identity(run):
    """What a checkpoint's weights are, as its meta file records it: the model config(s), mode and objective (rtd:
    the sharing and the training kind, which decides how many engines the checkpoint holds)."""
    rtd = run.objective == "rtd"
    return {"model_config": run.model_config().to_dict(), "mode": run.mode, "objective": run.objective,
            "generator_config": run.generator_config().to_dict() if rtd else None,
            "embedding_sharing": run.embedding_sharing if rtd else None,
            "rtd_training": run.rtd_training if rtd else None}


def check_compatible(meta, identity, source):
    """Refuse a checkpoint whose model, mode or objective differ from this run's (model_identity), naming both."""
    if "model_config" not in meta or "mode" not in meta:
        raise CheckpointError(f"{source}: not a pretraining checkpoint (its {META} has no model_config or mode)")
    for key in ("model_config", "generator_config"):
        saved, now = meta.get(key), identity.get(key)
        if saved is None or now is None:
            continue
        diffs = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v and k != "attention_impl"}
        if diffs:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diffs.items()))
            what = "the model config" if key == "model_config" else "the generator's config"
            raise CheckpointError(f"{source}: {what} differs from the checkpoint's ({detail})")
    if meta["mode"] != identity["mode"]:
        raise CheckpointError(f"{source}: written in mode {meta['mode']!r}, this run is {identity['mode']!r}; convert it "
                              "first (deberta-ds convert to-release, then init_from_release)")
    for key in ("objective", "embedding_sharing"):
        saved = meta.get(key, "mlm" if key == "objective" else None)
        if saved != identity.get(key):
            raise CheckpointError(f"{source}: written with {key} {saved!r}, this run has {identity.get(key)!r}")
    # rtd checkpoints written before decoupled training existed are joint ones (one engine)
    saved = meta.get("rtd_training", "joint" if meta.get("objective") == "rtd" else None)
    if saved != identity.get("rtd_training"):
        raise CheckpointError(f"{source}: written with rtd_training {saved!r}, this run has "
                              f"{identity.get('rtd_training')!r} (one engine against two: the optimizer states do not "
                              f"carry over); continue it with --set rtd_training={saved}, or start a new run from its "
                              "release (deberta-ds convert to-release, then --set init_from_release=RELEASE)")


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
    trained_with = meta.get("tokenizer_sha256")  # every build's meta file has it at the top
    if trained_with and trained_with != now["tokenizer_sha256"]:
        raise CheckpointError(f"{source}: trained with tokenizer sha256 {trained_with[:16]}..., this run's "
                              f"is {now['tokenizer_sha256'][:16]}...: the model's embeddings belong to the checkpoint's "
                              "tokenizer. Use its shards (and spm.model), or start a new run (convert to a release, "
                              "then init_from_release) to change tokenizers")
    saved = meta.get("data")
    if not saved:  # an older build recorded the tokenizer only
        return False
    # blocks_sha256 (the block lists the loader checks against) only where the checkpoint has it: older builds'
    # checkpoints resume as before
    compared = ("shards_sha256", "num_samples", "max_seq_len") + (("blocks_sha256",) if "blocks_sha256" in saved else ())
    training = [k for k in compared if saved.get(k) != now.get(k)]
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


def check_run_changes(meta, run_config, source):
    """{setting: [checkpoint's value, this run's]} of the settings this resume applies (APPLIED); a setting
    that cannot change on resume raises a CheckpointError naming it and both values."""
    saved = meta.get("run_config")
    if not saved:  # a build that recorded no run config
        return {}
    now = run_config.to_dict()
    changed = {k: [saved[k], now[k]] for k in now if k in saved and _plain(saved[k]) != _plain(now[k])}
    refused = sorted(k for k in changed if k not in APPLIED + STEERING + CHECKED_ELSEWHERE)
    if refused:
        detail = ", ".join(f"{k}: checkpoint {changed[k][0]!r} vs run {changed[k][1]!r}" for k in refused)
        raise CheckpointError(f"{source}: {detail} cannot change when a run resumes (the data order, the batch or the "
                              "optimizer's state depend on them). Keep the checkpoint's values, or continue in a new run: "
                              "deberta-ds convert to-release, then --set init_from_release=RELEASE in a new --output-dir")
    return {k: v for k, v in changed.items() if k in APPLIED}


def check_engine_changes(meta, zero_stage, precision, source):
    """The ZeRO stage and precision a checkpoint was written with, against this run's. ZeRO-1 and ZeRO-2 partition
    the optimizer alike and load each other's checkpoints; ZeRO-3's files and another precision's optimizer files
    are others, which DeepSpeed's loader (also its universal format) cannot read: refused, with the way to
    change them."""
    saved_stage, saved_precision = meta.get("zero_stage", zero_stage), meta.get("precision", precision)
    alike = {saved_stage, zero_stage} <= {0, 1, 2} or saved_stage == zero_stage
    if alike and saved_precision == precision:
        return
    what = []
    if not alike:
        what.append(f"ZeRO stage {saved_stage} (this run: {zero_stage})")
    if saved_precision != precision:
        what.append(f"precision {saved_precision} (this run: {precision})")
    raise CheckpointError(f"{source}: written with {' and '.join(what)}; DeepSpeed cannot load its optimizer files "
                          "under this run's. Resume with the checkpoint's DeepSpeed config, or continue in a new run: "
                          "deberta-ds convert to-release, then --set init_from_release=RELEASE in a new --output-dir "
                          "(the weights move exactly; Adam's moments and the schedule start again)")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value




def load(checkpointer, stepper, tag, universal, changes):
    """The checkpoint into the stepper's engine(s); with a changed lr (or discriminator_lr) the schedules' peak
    rates become this run's. Returns the client state."""
    engines = getattr(stepper, "engines", (stepper.engine,))
    # this run's, before the checkpoint's replace them
    peak_rates = [list(engine.lr_scheduler.base_lrs) for engine in engines]
    client_state = checkpointer.load(stepper, tag, universal=universal)
    if {"lr", "discriminator_lr"} & set(changes):
        from pipeline.run.optim import follow_new_peak_rates
        for engine, rates in zip(engines, peak_rates):
            follow_new_peak_rates(engine, rates)
    return client_state
