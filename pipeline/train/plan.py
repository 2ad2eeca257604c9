"""`deberta-ds plan`: per-GPU memory of a run on a cluster shape, for ZeRO-1, 2 and 3 (mode zero3) and the
pipeline mode, each micro-batch that divides the global batch up to the run's, with and without activation
recomputation; and the fastest configuration that fits, by one rule (`choose`), which `deberta-ds pretrain
--deepspeed auto` applies (pipeline/train/auto_ds.py).

    deberta-ds plan --config configs/pretrain_xxlarge.json --nodes 8 --gpus-per-node 8 --gpu-memory-gb 80

**The rule** ("fastest"): the lowest ZeRO stage that fits, then no recomputation, then the largest
micro-batch, never above the run config's micro_batch_size. Why, per optimizer step (P parameters, A
gradient-accumulation steps, docs/architecture.md §5):
- ZeRO-1 moves 16-bit gradients once (reduce-scatter at the accumulation boundary) and the updated weights once
  (all-gather); ZeRO-2 reduce-scatters at every micro-batch (A times); ZeRO-3 also gathers the weights in every
  micro-batch's forward and again in its backward (and once more when recomputing). Each stage up adds
  communication per micro-batch, so a lower stage wins wherever it fits.
- Recomputation runs every layer's forward twice: about a third more compute (forward ≈ 1/3 of forward +
  backward), on every micro-batch, never hidden behind communication.
- A larger micro-batch only makes the kernels larger (and, under ZeRO-2/3, the accumulation steps fewer).
The run's micro_batch_size is the cap: the global batch does not change, only how it is cut.

**Model states** come from DeepSpeed's estimators where it has one: ZeRO-2 `estimate_zero2_model_states_mem_needs`
(2 bytes/param of 16-bit weights + 18/N of 16-bit and fp32 gradients, fp32 weights and Adam's moments), ZeRO-3
`estimate_zero3_model_states_mem_needs` (the largest tensor gathered + 18/N). DeepSpeed has none for ZeRO-1; it
is ZeRO-2's count with the 16-bit gradients whole, as ZeRO-1 keeps them until the boundary: 4 + 16/N bytes/param.
Pipeline mode + ZeRO-1: one stage's 16-bit weights and gradients (4 bytes/param) plus its fp32 weights and
moments (12 bytes/param) over the data-parallel replicas, times DeepSpeed's buffer factor 1.5. With offload
(a --deepspeed config that offloads the optimizer), DeepSpeed's offload branches. In fp32 (CPU runs) every
figure is doubled, an upper bound.

**Activations** per layer and micro-batch of b sequences of length s (16-bit), after Korthikanti et al. (2022)
for a BERT block (34·s·b·h: the projections, q, k, v, the attention output, the FFN, the LayerNorms), plus what
attention keeps beyond them:
- s <= 512, eager disentangled attention: DeBERTa's [b, heads, s, s] tensors,
    34·s·b·h + 7·a·s²·b bytes      (h hidden, a heads; 7 = scores, gathered c2p, gathered p2c, probabilities,
                                     dropout mask, and the two 1-byte masks rounded up)
- s > 512: the linear-memory path is assumed (blockwise/fused attention, which keeps q, k, v, the output and the
  fp32 logsumexp: O(s) per layer, nothing of size s²): 34·s·b·h + 4·a·s·b bytes. The eager path's s² term would
  be 7·a·s²·b (2 GiB per layer and sequence of 8192 tokens with 4 heads): long sequences need the fused path.
With recomputation only each layer's input (2·s·b·h) is kept, plus one layer recomputed. In pipeline mode a
stage holds L/stages layers for up to `stages` micro-batches in flight (1F1B). Objective rtd counts generator
and discriminator (parameters and layers) and plans mode zero3 only, the one it runs in.

**Sequence parallelism** (`--sequence-parallel SP`, DeepSpeed Ulysses; mode zero3): the world's ranks are
data-parallel ranks x SP. Each rank holds s/SP tokens of every sequence in the per-token parts of the encoder
(34·s·b·h/SP), and inside attention all s tokens of a/SP heads (the attention term with a/SP heads at full
length), so SP must divide the heads and the world. The Enhanced Mask Decoder (and the MLM head) run on the
whole sequence on every rank of an SP group: its layer is counted at full length and all heads. Parameters,
gradients and optimizer states are partitioned by ZeRO over all world ranks, as without SP; the micro-batches
are cut for the data-parallel ranks (world / SP).

"Fits" is under 90% of the memory: the rest holds communication buckets, the MLM logits at the masked positions
and the allocator's fragmentation. These are estimates: check the run's memory_gb metric before committing a
cluster. Importable without CUDA (DeepSpeed's estimators are plain arithmetic).
"""
import json

from pipeline.cli_types import positive_float, positive_int
from pipeline.errors import ConfigError
from pipeline.train.config import RunConfig

GB = 1024 ** 3
FIT_FRACTION = 0.9
ZERO_STAGES = (1, 2, 3)
RULE = ("the lowest ZeRO stage that fits, then no recomputation, then the largest micro-batch up to the run's "
        "micro_batch_size")


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="run config: a JSON file or a shipped name (xxlarge, tiny_cpu)")
    parser.add_argument("--deepspeed", default=None,
                        help="plan only this DeepSpeed config's ZeRO stage and offload (default: ZeRO-1, 2 and 3 "
                        "without offload, what --deepspeed auto chooses from)")
    parser.add_argument("--nodes", type=positive_int, default=1, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per node")
    parser.add_argument("--gpu-memory-gb", type=positive_float, default=80.0, help="memory of one GPU in GiB")
    parser.add_argument("--seq-len", type=positive_int, default=512,
                        help="sequence length (default %(default)s; above 512 the linear-memory attention path is "
                        "assumed; the EMD's position table grows to it, as pretraining on such shards does)")
    parser.add_argument("--sequence-parallel", type=positive_int, default=None, metavar="SP",
                        help="sequence-parallel degree (DeepSpeed Ulysses): each rank holds seq-len/SP tokens, and "
                        "inside attention heads/SP heads at full length; must divide the heads and the world size "
                        "(default: the run config's sequence_parallel_size, else 1)")
    parser.add_argument("--pipeline-stages", type=positive_int, default=None,
                        help="stages for the pipeline mode (default: the run config's, or the GPUs per node)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config setting")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def parameter_counts(run):
    """(total parameters, largest single tensor's parameters) of what the run trains: the MLM model, or for
    rtd generator and discriminator together."""
    import torch
    from model.heads import DebertaForMaskedLM
    from model.rtd import RTDModel
    config = run.model_config()
    with torch.device("meta"):
        model = RTDModel(config, run.generator_config(), run.embedding_sharing, emd=run.emd) \
            if run.objective == "rtd" else DebertaForMaskedLM(config, emd=run.emd)
    return sum(p.numel() for p in model.parameters()), max(p.numel() for p in model.parameters())


def layers_run(run):
    """Encoder layers one step runs forward (the EMD runs the last one once more); rtd: both networks'."""
    return encoder_layers_run(run) + emd_layers_run(run)


def encoder_layers_run(run):
    """The encoder layers one step runs forward, EMD aside (rtd: both networks')."""
    layers = run.model_config().num_hidden_layers
    if run.objective == "rtd":
        layers += run.generator_config().num_hidden_layers
    return layers


def emd_layers_run(run):
    """The EMD's extra run of the last layer: the MLM model's, or with rtd the generator's."""
    return 1 if run.emd else 0


LINEAR_ATTENTION_ABOVE = 512  # longer sequences are planned with the linear-memory attention path


def attention_path(seq_len):
    return "linear" if seq_len > LINEAR_ATTENTION_ABOVE else "eager"


def layer_bytes(config, micro_batch, seq_len, sp=1):
    """One layer's activations on one rank: the per-token parts over s/SP tokens, attention's for a/SP heads at
    full length (module docstring)."""
    h, a, s, b = config.hidden_size, config.num_attention_heads, seq_len, micro_batch
    attention = 4 * a * s * b if attention_path(s) == "linear" else 7 * a * s * s * b
    return (34 * s * b * h + attention) / sp


def activation_bytes(config, micro_batch, seq_len, layers, checkpointing, sp=1, emd_layers=0):
    """Activations per rank of `layers` encoder layers split over SP ranks plus `emd_layers` run on the whole
    sequence (the EMD, duplicated on each rank of an SP group); with checkpointing only each layer's input is
    kept, and the largest layer once more, recomputed."""
    s, b, h = seq_len, micro_batch, config.hidden_size
    split, whole = layer_bytes(config, b, s, sp), layer_bytes(config, b, s)
    if checkpointing:
        return layers * 2 * s * b * h / sp + emd_layers * 2 * s * b * h + (whole if emd_layers else split)
    return layers * split + emd_layers * whole


def check_sequence_parallel(run, sp, gpus):
    """SP must divide every network's heads (each rank takes heads/SP of them) and the world (ranks = dp x SP)."""
    configs = [run.model_config()] + ([run.generator_config()] if run.objective == "rtd" else [])
    heads = sorted({c.num_attention_heads for c in configs})
    if any(h % sp for h in heads):
        raise ConfigError(f"--sequence-parallel {sp} does not divide the model's {'/'.join(map(str, heads))} "
                          f"attention heads (model {run.model!r}): each rank takes heads/SP of them")
    if gpus % sp:
        raise ConfigError(f"--sequence-parallel {sp} does not divide the {gpus} GPUs: ranks = data-parallel ranks x SP")


def zero_states(stage, total, largest, gpus_per_node, nodes, offload):
    """Model states per GPU (bytes, 16-bit training) under ZeRO `stage` in mode zero3."""
    gpus = gpus_per_node * nodes
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes, cpu_offload=offload,
                                                          cpu_offload_params=offload, zero_init=True)
        return gpu
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    _, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=offload)
    if stage == 1:  # ZeRO-1 keeps the 16-bit gradients whole until the accumulation boundary
        gpu += 2 * total - (0 if offload else int(2 * total / gpus))
    return gpu


def pipeline_states(total, stages, dp):
    per_stage = total / stages
    return per_stage * 4 + per_stage * 12 * 1.5 / dp


def micro_batches(run, dp):
    """The micro-batch sizes a run can use on `dp` data-parallel ranks: up to its micro_batch_size, each dividing
    its share of the global batch (the global batch stays; accumulation makes up the rest)."""
    if run.global_batch_size % dp:
        return []
    share = run.global_batch_size // dp
    return [m for m in range(1, min(run.micro_batch_size, share) + 1) if share % m == 0]


def candidates(run, gpus, stages, zero_stages, offload, sp=1):
    """(mode, ZeRO stage, pipeline stages, data-parallel size) of each engine setup the plan considers."""
    setups = [("zero3", stage, 1, gpus // sp) for stage in zero_stages]
    # rtd trains in mode zero3 only; a pipeline needs its stages to divide the GPUs (and one stage is shown only
    # for a run in pipeline mode); sequence parallelism is planned in mode zero3 only
    if run.objective == "mlm" and (stages > 1 or run.mode == "pipeline") and gpus % stages == 0 and not offload \
            and sp == 1:
        setups.append(("pipeline", 1, stages, gpus // stages))
    return setups


def plan(run, nodes, gpus_per_node, gpu_memory_gb, seq_len, stages, zero_stages=ZERO_STAGES, offload=False,
         element_bytes=2, sequence_parallel=1):
    """Every considered (setup, micro-batch, recomputation) with its memory, and the choice for the run's mode.
    element_bytes: 2 for bf16/fp16, 4 for fp32 (every figure doubled). sequence_parallel: SP (module docstring)."""
    gpus = nodes * gpus_per_node
    sp = sequence_parallel
    check_sequence_parallel(run, sp, gpus)
    run, _ = run.fitted_to(seq_len)  # the EMD's table as long as the sequences, as pretraining on them makes it
    config = run.model_config()
    total, largest = parameter_counts(run)
    encoder_layers, emd_layers = encoder_layers_run(run), emd_layers_run(run)
    scale = element_bytes / 2
    rows, notes = [], []
    if run.mode == "pipeline" and gpus % stages:
        notes.append(f"pipeline mode: pipeline_stages {stages} does not divide the {gpus} GPUs")
    if sp > 1 and (run.mode == "pipeline" or stages > 1):
        notes.append(f"pipeline mode is not planned with sequence parallelism (SP {sp}): mode zero3 only")
    for mode, stage, pipe_stages, dp in candidates(run, gpus, stages, zero_stages, offload, sp):
        states = scale * (zero_states(stage, total, largest, gpus_per_node, nodes, offload) if mode == "zero3"
                          else pipeline_states(total, pipe_stages, dp))
        # 1F1B: the first stage holds the activations of up to `stages` micro-batches at once
        layers = encoder_layers + emd_layers
        mode_layers = layers if mode == "zero3" else -(-layers // pipe_stages) * pipe_stages
        sizes = micro_batches(run, dp)
        if not sizes:
            notes.append(f"{mode} ZeRO-{stage}: global_batch_size {run.global_batch_size} does not divide over {dp} "
                         f"data-parallel ranks in micro-batches of at most {run.micro_batch_size}")
        for micro in sizes:
            for checkpointing in (False, True):
                if mode == "zero3":
                    activations = scale * activation_bytes(config, micro, seq_len, encoder_layers, checkpointing,
                                                           sp, emd_layers)
                else:
                    activations = scale * activation_bytes(config, micro, seq_len, mode_layers, checkpointing)
                need = states + activations
                rows.append({"mode": mode, "zero_stage": stage, "stages": pipe_stages, "micro_batch": micro,
                             "activation_checkpointing": checkpointing, "model_states_gb": states / GB,
                             "activations_gb": activations / GB, "total_gb": need / GB,
                             "fits": need <= FIT_FRACTION * gpu_memory_gb * GB})
    choice = choose(rows, run.mode)
    for row in rows:
        row["chosen"] = row is choice
    return {"parameters": total, "objective": run.objective, "mode": run.mode, "gpus": gpus, "nodes": nodes,
            "gpus_per_node": gpus_per_node, "gpu_memory_gb": gpu_memory_gb, "seq_len": seq_len,
            "sequence_parallel": sp, "data_parallel": gpus // sp, "attention": attention_path(seq_len),
            "cpu_offload": offload, "precision_bytes": element_bytes, "rule": RULE, "rows": rows, "notes": notes,
            "choice": choice}


def rule_key(row):
    """Lower is faster: ZeRO stage, then recomputation, then the larger micro-batch (module docstring)."""
    return row["zero_stage"], row["activation_checkpointing"], -row["micro_batch"]


def choose(rows, mode):
    """The fastest fitting row of `mode` by the rule, or None when nothing fits."""
    return min((r for r in rows if r["mode"] == mode and r["fits"]), key=rule_key, default=None)


def describe(row):
    """'ZeRO-1, micro-batch 16, no recomputation' (pipeline mode: '4-stage pipeline + ZeRO-1, ...')."""
    engine = f"{row['stages']}-stage pipeline + ZeRO-{row['zero_stage']}" if row["mode"] == "pipeline" \
        else f"ZeRO-{row['zero_stage']}"
    recompute = "activation recomputation" if row["activation_checkpointing"] else "no recomputation"
    return f"{engine}, micro-batch {row['micro_batch']}, {recompute}"


def nothing_fits(result):
    """Why nothing fits, and what to do, in one line."""
    mine = [r for r in result["rows"] if r["mode"] == result["mode"]]
    if not mine:
        return "; ".join(result["notes"]) or f"no setup of mode {result['mode']} for {result['gpus']} GPUs"
    least = min(mine, key=lambda r: r["total_gb"])
    devices = f"{result['gpus']} device{'s' if result['gpus'] > 1 else ''}"
    return (f"nothing fits in {FIT_FRACTION:.0%} of {result['gpu_memory_gb']:.3g} GiB on each of {devices}: "
            f"the smallest, {describe(least)}, needs {least['total_gb']:.1f} GiB. Use more devices, a shorter "
            "sequence, or offload (--deepspeed zero3_offload_bf16 --set optimizer=cpu_adam)")


def print_table(result):
    what = " (generator and discriminator)" if result["objective"] == "rtd" else ""
    precision = "fp32" if result["precision_bytes"] == 4 else "16-bit"
    print(f"{result['parameters']:,} parameters{what} on {result['gpus']} GPUs of {result['gpu_memory_gb']:g} GiB "
          f"(seq {result['seq_len']}, {precision}; offload: {'on' if result['cpu_offload'] else 'off'}); fits = under "
          f"{FIT_FRACTION:.0%}")
    if result["sequence_parallel"] > 1:
        print(f"sequence parallel {result['sequence_parallel']}: {result['data_parallel']} data-parallel ranks x "
              f"{result['sequence_parallel']}; per rank {result['seq_len'] // result['sequence_parallel']} tokens of "
              "each sequence, and in attention 1/SP of the heads at full length; the EMD on the whole sequence on "
              "every rank; ZeRO over all ranks")
    if result["attention"] == "linear":
        print(f"attention: the linear-memory path is assumed above {LINEAR_ATTENTION_ABOVE} tokens (blockwise/fused: "
              "q, k, v, output and logsumexp kept, O(seq) per layer), not the eager path's seq² scores")
    print(f"{'mode':9} {'ZeRO':>4} {'stages':>6} {'micro':>5} {'recompute':>9} {'states GiB':>10} {'total GiB':>9}  fits")
    for r in result["rows"]:
        print(f"{r['mode']:9} {r['zero_stage']:>4} {r['stages']:>6} {r['micro_batch']:>5} "
              f"{'yes' if r['activation_checkpointing'] else 'no':>9} {r['model_states_gb']:>10.2f} "
              f"{r['total_gb']:>9.2f}  {'yes' if r['fits'] else 'no':3}{'  <- chosen' if r['chosen'] else ''}")
    for note in result["notes"]:
        print(f"note: {note}")
    choice = result["choice"]
    print(f"rule: {result['rule']}")
    if choice:
        print(f"chosen (mode {result['mode']}): {describe(choice)} ({choice['total_gb']:.3g} GiB of "
              f"{result['gpu_memory_gb']:g}); `deberta-ds pretrain --deepspeed auto` on this shape uses it")
    else:
        print(f"chosen (mode {result['mode']}): {nothing_fits(result)}")
    if result["mode"] == "zero3" and any(r["mode"] == "pipeline" for r in result["rows"]):
        pipe = choose(result["rows"], "pipeline")
        if pipe:
            print(f"pipeline mode (--set mode=pipeline --set pipeline_stages={pipe['stages']}): {describe(pipe)} "
                  f"({pipe['total_gb']:.3g} GiB)")


def run(args):
    from pipeline.run.ds_config import load_ds_config, offloads_optimizer, precision, zero_stage
    run_config = RunConfig.from_file(args.config, args.set)
    zero_stages, offload, element_bytes = ZERO_STAGES, False, 2
    if args.deepspeed:
        ds, source = load_ds_config(args.deepspeed)
        if zero_stage(ds) == 0:
            raise ConfigError(f"{source}: ZeRO stage 0; the plan covers ZeRO-1, 2 and 3")
        zero_stages, offload = (zero_stage(ds),), offloads_optimizer(ds)
        element_bytes = 4 if precision(ds) == "fp32" else 2
    stages = args.pipeline_stages or (run_config.pipeline_stages if run_config.pipeline_stages > 1 else args.gpus_per_node)
    sp = args.sequence_parallel or run_config.sequence_parallel_size
    result = plan(run_config, args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.seq_len, stages,
                  zero_stages, offload, element_bytes, sp)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0
