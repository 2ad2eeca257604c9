"""`deberta-ds plan`: per-GPU memory of a run on a cluster shape, for both engine modes and a range of
micro-batch sizes, before anything is launched.

    deberta-ds plan --config configs/pretrain_xxlarge.json --nodes 2 --gpus-per-node 8 --gpu-memory-gb 80

Model states come from DeepSpeed's own estimators (ZeRO-3: estimate_zero3_model_states_mem_needs, with
offload when the DeepSpeed config offloads). Pipeline mode + ZeRO-1 has no DeepSpeed estimator; we count
16-bit weights and gradients of one stage (4 bytes/param) plus the fp32 master weights and Adam moments
(12 bytes/param) divided over the data-parallel replicas, plus DeepSpeed's 1.5 buffer factor on the last.

Activations per layer and micro-batch of b sequences of length s (bf16, eager disentangled attention),
after Korthikanti et al. (2022) for a BERT block, plus DeBERTa's extra [b, heads, s, s] tensors:
    34·s·b·h + 7·a·s²·b bytes      (h hidden, a heads; 7 = scores, gathered c2p, gathered p2c, probabilities,
                                     dropout mask, and the two 1-byte masks rounded up)
With activation checkpointing only each layer's input (2·s·b·h) is kept, plus one layer recomputed.
In pipeline mode a stage holds L/stages layers for up to `stages` micro-batches in flight (1F1B). Objective rtd
counts generator and discriminator (parameters and layers) and plans the zero3 mode only, the one it runs in.
These are estimates: measure with the run's memory_gb metric before committing a cluster.
"""
import json

from pipeline.cli_types import positive_float, positive_int
from pipeline.run.ds_config import load_ds_config, offloads_optimizer
from pipeline.train.config import RunConfig

GB = 1024 ** 3


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="run config: a JSON file or a shipped name (xxlarge, tiny_cpu)")
    parser.add_argument("--deepspeed", default="zero3_bf16",
                        help="DeepSpeed config of the ZeRO-3 mode, for its offload settings (default zero3_bf16)")
    parser.add_argument("--nodes", type=positive_int, default=1, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per node")
    parser.add_argument("--gpu-memory-gb", type=positive_float, default=80.0, help="memory of one GPU in GiB")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="sequence length")
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
    config = run.model_config()
    layers = config.num_hidden_layers + (1 if run.emd and run.objective == "mlm" else 0)
    if run.objective == "rtd":
        layers += run.generator_config().num_hidden_layers + (1 if run.emd else 0)
    return layers


def activation_bytes(config, micro_batch, seq_len, layers, checkpointing):
    h, a, s, b = config.hidden_size, config.num_attention_heads, seq_len, micro_batch
    full_layer = 34 * s * b * h + 7 * a * s * s * b
    if checkpointing:
        return layers * 2 * s * b * h + full_layer
    return layers * full_layer


def zero3_states(total, largest, gpus_per_node, nodes, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes, cpu_offload=offload,
                                                      cpu_offload_params=offload, zero_init=True)
    return gpu


def pipeline_states(total, stages, dp):
    per_stage = total / stages
    return per_stage * 4 + per_stage * 12 * 1.5 / dp


def plan(run, ds, nodes, gpus_per_node, gpu_memory_gb, seq_len, stages):
    config = run.model_config()
    total, largest = parameter_counts(run)
    gpus = nodes * gpus_per_node
    offload = offloads_optimizer(ds)
    layers = layers_run(run)
    modes = ("zero3",) if run.objective == "rtd" else ("zero3", "pipeline")  # rtd trains in zero3 mode only
    rows = []
    for mode in modes:
        if mode == "pipeline" and (stages < 1 or gpus % stages):
            continue
        states = zero3_states(total, largest, gpus_per_node, nodes, offload) if mode == "zero3" \
            else pipeline_states(total, stages, gpus // stages)
        # 1F1B: the first stage holds the activations of up to `stages` micro-batches at once
        mode_layers = layers if mode == "zero3" else -(-layers // stages) * stages
        for micro in (1, 2, 4, 8, 16, 32, 64):
            for checkpointing in (False, True):
                need = states + activation_bytes(config, micro, seq_len, mode_layers, checkpointing)
                rows.append({"mode": mode, "stages": stages if mode == "pipeline" else 1, "micro_batch": micro,
                             "activation_checkpointing": checkpointing, "model_states_gb": states / GB,
                             "total_gb": need / GB, "fits": need <= 0.9 * gpu_memory_gb * GB})
    return {"parameters": total, "objective": run.objective, "gpus": gpus, "gpu_memory_gb": gpu_memory_gb,
            "cpu_offload": offload, "modes": list(modes), "rows": rows}


def best(rows, mode):
    fitting = [r for r in rows if r["mode"] == mode and r["fits"]]
    # the largest micro-batch, without recomputation if that fits as well
    return max(fitting, key=lambda r: (r["micro_batch"], not r["activation_checkpointing"]), default=None)


def run(args):
    run_config = RunConfig.from_file(args.config, args.set)
    ds, _ = load_ds_config(args.deepspeed)
    stages = args.pipeline_stages or (run_config.pipeline_stages if run_config.pipeline_stages > 1 else args.gpus_per_node)
    result = plan(run_config, ds, args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.seq_len, stages)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    what = " (generator and discriminator)" if result["objective"] == "rtd" else ""
    print(f"{result['parameters']:,} parameters{what} on {result['gpus']} GPUs of {args.gpu_memory_gb:g} GiB "
          f"(seq {args.seq_len}; ZeRO-3 offload: {'on' if result['cpu_offload'] else 'off'}); fits = under 90%")
    print(f"{'mode':9} {'stages':>6} {'micro':>5} {'act.ckpt':>8} {'states GiB':>10} {'total GiB':>9}  fits")
    for r in result["rows"]:
        print(f"{r['mode']:9} {r['stages']:>6} {r['micro_batch']:>5} {str(r['activation_checkpointing']):>8} "
              f"{r['model_states_gb']:>10.2f} {r['total_gb']:>9.2f}  {'yes' if r['fits'] else 'no'}")
    for mode in result["modes"]:
        choice = best(result["rows"], mode)
        if choice:
            print(f"{mode}: micro_batch {choice['micro_batch']}"
                  f"{' with activation checkpointing' if choice['activation_checkpointing'] else ''} fits "
                  f"({choice['total_gb']:.1f} GiB of {args.gpu_memory_gb:g})")
        else:
            print(f"{mode}: nothing fits")
    return 0
