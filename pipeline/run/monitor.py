"""What a run shows (pretraining and fine-tuning alike): TensorBoard scalars, a progress bar with ETA and one
summary line per log interval on rank 0, every step's loss and one JSON line per logged step and per
evaluation in metrics.jsonl (evaluation keys start with val_; tests and scripts read it), and the run's other
messages (`say`), all written by rank 0 only.

MFU estimate. FLOPs per trained token (forward + backward = 3 x forward; a multiply-add = 2 FLOPs):
    6 · N_dense                                  the weight matmuls (nanoGPT/PaLM's 6N), N_dense = the
                                                 encoder's non-embedding weights x (L + emd_steps - 1)/L
                                                 (the EMD runs the last layer twice instead of once)
  + 12 · L_eff · D · (T + 2k)                    attention: QKᵀ and PV over T keys (4·T·D per token and
                                                 layer forward) plus c2p and p2c against the 2k relative
                                                 rows (4·2k·D)
  + 6 · p · D · V                                the tied MLM decoder, only at the predicted fraction p
(objective rtd: the generator's count, plus the discriminator's without EMD and decoder: run_flops_per_token)
divided by the step time and by (peak FLOP/s per device x devices). Peak: `peak_tflops` from the run
config, else a table of known accelerators (bf16/fp16 dense); none on the CPU (MFU then not shown).
"""
import json
import os
import resource
import sys
import time

import torch

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10": 125.0, "L40": 181.0, "V100": 125.0}


def flops_per_token(config, seq_len, emd_steps=2, predicted_fraction=0.15):
    D, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inner = config.num_attention_heads * config.head_size
    per_layer = 3 * D * inner + inner * D + 2 * D * config.intermediate_size
    layers = L + max(emd_steps - 1, 0)
    attention = 12 * layers * inner * (seq_len + (2 * config.att_span if config.relative_attention else 0))
    return 6 * per_layer * layers + attention + 6 * predicted_fraction * config.embed_size * V


def run_flops_per_token(run, seq_len):
    """flops_per_token of a run's model(s): with objective rtd the generator (its EMD and MLM decoder at the
    masked fraction) plus the discriminator (every layer once, no decoder)."""
    emd_steps = 2 if run.emd else 0
    if run.objective != "rtd":
        return flops_per_token(run.model_config(), seq_len, emd_steps)
    return (flops_per_token(run.generator_config(), seq_len, emd_steps)
            + flops_per_token(run.model_config(), seq_len, emd_steps=0, predicted_fraction=0.0))


def guess_peak_tflops():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def memory_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


class Monitor:
    """Rank 0 writes; other ranks call the same methods and nothing happens."""

    def __init__(self, output_dir, rank, start_step, max_steps, tokens_per_step=None, samples_per_step=None,
                 flops_per_step=None, peak_flops=None):
        self.active = rank == 0
        self.tokens_per_step, self.samples_per_step = tokens_per_step, samples_per_step
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.last_time, self.last_step = time.time(), start_step
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self.metrics = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=not sys.stderr.isatty() and os.environ.get("DEBERTA_DS_PROGRESS") != "1")

    def step(self, step, values):
        """Every step: the progress bar, and the step's loss in metrics.jsonl (key "loss"), so exact-resume checks
        compare all steps and a killed run keeps every step it finished."""
        if not self.active:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}")
        self.metrics.write(json.dumps({"step": step, "loss": values["loss"]}) + "\n")
        self.metrics.flush()

    def say(self, message):
        """One line on stderr from rank 0 (through the progress bar, which keeps its place)."""
        from pipeline.run.lifecycle import say
        say(0 if self.active else 1, message)

    def log(self, step, values):
        if not self.active:
            return
        now = time.time()
        steps = max(step - self.last_step, 1)
        seconds = max(now - self.last_time, 1e-9) / steps
        self.last_time, self.last_step = now, step
        values = dict(values, step_time_s=seconds, memory_gb=memory_gb())
        if self.tokens_per_step:
            values.update(tokens_per_s=self.tokens_per_step / seconds, samples_per_s=self.samples_per_step / seconds)
        if self.peak_flops:
            values["mfu"] = self.flops_per_step / seconds / self.peak_flops
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"train/{key}", value, step)
        self.metrics.write(json.dumps(dict(step=step, **values)) + "\n")
        self.metrics.flush()
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if v is not None)
        self.bar.write(f"step {step} {shown}")

    def record_eval(self, step, values):
        """A held-out evaluation (pipeline/train/evaluate.py): metrics.jsonl (keys val_*), TensorBoard (val/*) and
        one line. Its time is left out of the throughput of the next log line."""
        self.last_time += values.get("eval_time_s", 0.0)
        if not self.active:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"val/{key}", value, step)
        self.metrics.write(json.dumps(dict(step=step, **values)) + "\n")
        self.metrics.flush()
        self.bar.write(f"eval at step {step} " + " ".join(f"{k}={v:.4g}" for k, v in values.items()
                                                         if isinstance(v, (int, float))))

    def close(self):
        if self.active:
            self.bar.close()
            self.writer.flush()
            self.writer.close()
            self.metrics.close()
