"""`deberta-ds convert`: training checkpoints -> release directories (the format transformers loads).

    deberta-ds convert to-release --checkpoint RUN/checkpoints --output DIR [--tag global_stepN]
        [--dtype fp32|bf16|fp16] [--max-shard-size 5GB] [--tokenizer spm.model] [--verify]

It reads the fp32 master weights wherever DeepSpeed keeps them (pipeline/release/master_weights.py) and
writes them with the release writer (pipeline/release/write.py). A checkpoint of an rtd run (DeBERTa-v3)
gives the published v3 layout (pipeline/release/rtd.py): the discriminator as a deberta-v2 model that
AutoModel loads, its generator beside it in pytorch_model.generator.bin with generator_config.json.

The other direction needs no conversion: a release directory (ours, the published
microsoft/deberta-v2-xxlarge layout, or transformers' legacy `cls.predictions.*` layout) starts a run
in either mode with the run-config setting `init_from_release` (`--set init_from_release=DIR`), and
fine-tuning with `deberta-ds finetune --release DIR`. Moving a run between zero3 and pipeline mode is
to-release then init_from_release: the weights move exactly, Adam's moments and the step count restart.

Output is written under a temporary name and renamed at the end: a failure leaves no output directory. The
final rename refuses a target that another convert finished meanwhile (unless --overwrite), and the temporary
directory of a convert that was killed is removed by the next convert to that name (pipeline/io.py).
Safetensors files are written tensor by tensor at precomputed offsets, so memory holds one tensor at a
time (plus whatever pages of the memory-mapped source the kernel keeps).
"""
import json
import os
import resource
import sys
import time

from pipeline.errors import ReleaseError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    rel = sub.add_parser("to-release", help="training checkpoint (zero3, pipeline or universal) -> release directory",
                         description="Write a release directory (config.json, model.safetensors, spm.model, "
                         "tokenizer config) that transformers' AutoModel/AutoModelForMaskedLM/AutoTokenizer load.")
    rel.add_argument("--checkpoint", required=True,
                     help="RUN/checkpoints (a tag is chosen in it), a run directory holding checkpoints/, or one "
                     "tag directory (global_stepN or global_stepN_universal)")
    rel.add_argument("--tag", help="global_stepN, or global_stepN_universal for DeepSpeed's universal format "
                     "(default: the newest finished tag, i.e. one with deberta_ds.json)")
    rel.add_argument("--output", required=True, help="release directory to create (new or empty; a previous release only with --overwrite)")
    rel.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                     help="dtype of the released weights (default fp32; cast from the fp32 master weights)")
    rel.add_argument("--max-shard-size", default="5GB",
                     help="largest safetensors file; above it the weights are sharded with an index (default 5GB)")
    rel.add_argument("--tokenizer", help="spm.model to ship (default: the run's tokenizer, or data_dir/spm.model "
                     "from the run config); its sha256 must match the checkpoint's tokenizer_sha256")
    rel.add_argument("--source", choices=("auto", "optimizer", "layers"), default="auto",
                     help="pipeline checkpoints only: read the fp32 master weights from the optimizer files "
                     "('optimizer') or the module weights from layer_XX-model_states.pt ('layers'); 'auto' "
                     "prefers the optimizer files when present (default)")
    rel.add_argument("--verify", action="store_true",
                     help="load the result in transformers and compare MLM logits with our model on a fixed "
                     "input (prints the max difference; fails above 1e-4)")
    rel.add_argument("--overwrite", action="store_true", help="replace a previous release in --output (only a release directory: anything else there is refused); the new release is complete before the old one goes")


def run(args):
    to_release(args)
    return 0


# ---------------------------------------------------------------- tokenizer
def find_tokenizer(meta, given):
    """The spm.model to ship: --tokenizer, else the run's (tokenizer or data_dir/spm.model); checked against
    the fingerprint the run recorded."""
    from pipeline.data.tokenizer import file_sha256
    run = meta.get("run_config") or {}
    candidates = [given] if given else [p for p in (run.get("tokenizer"),
                                                     os.path.join(run.get("data_dir") or "", "spm.model")) if p]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise ReleaseError(f"no tokenizer: {' or '.join(candidates) or 'nothing'} "
                              f"{'does' if given else 'do'} not exist; give --tokenizer spm.model (the shard "
                              "directory's spm.model)")
    want = meta.get("tokenizer_sha256")
    if want and file_sha256(found) != want:
        raise ReleaseError(f"{found}: sha256 {file_sha256(found)[:16]}... is not the tokenizer this run trained with "
                              f"({want[:16]}...); give the run's spm.model with --tokenizer")
    return found


# ---------------------------------------------------------------- verify
def verify(path, emd, atol=1e-4, task="mlm"):
    """transformers vs our model on a fixed input, one model in memory at a time: the MLM logits, or for a v3
    release (task "base") the discriminator's last hidden states. Returns the max |diff|."""
    import torch
    import transformers

    from pipeline.release.read import load_release
    transformers.utils.logging.disable_progress_bar()
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, config["vocab_size"] - 1, (2, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    auto = transformers.AutoModelForMaskedLM if task == "mlm" else transformers.AutoModel
    theirs, info = auto.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ReleaseError(f"{path}: transformers reports missing {info['missing_keys']} / mismatched "
                           f"{info['mismatched_keys']} keys")
    field = "logits" if task == "mlm" else "last_hidden_state"
    with torch.no_grad():
        expected = getattr(theirs.eval()(input_ids=ids, attention_mask=mask), field)
    del theirs
    # our MLM head on the last layer, as transformers computes it (transformers has no EMD)
    ours = load_release(path, task=task, emd=False, dtype=torch.float32)
    with torch.no_grad():
        got = getattr(ours(input_ids=ids, attention_mask=mask), field)
    del ours
    keep = mask.bool()
    diff = (got[keep] - expected[keep]).abs().max().item()
    what = "MLM logits" if task == "mlm" else "discriminator hidden states"
    print(f"verify: transformers vs deberta-ds {what} on a fixed [2, 16] input: max |diff| {diff:.3g}", file=sys.stderr)
    if not diff <= atol:
        raise ReleaseError(f"{path}: transformers' {what} differ from ours by {diff:.3g} (> {atol})")
    if os.path.exists(os.path.join(path, "spm.model")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        tokenizer("verify the tokenizer loads")
    return diff


# ---------------------------------------------------------------- to-release
def to_release(args):
    import torch

    from model.config import DebertaConfig
    from pipeline.io import staged_directory
    from pipeline.release import master_weights
    from pipeline.release.write import check_output, mlm_layout, parse_size, write_config, write_tensors, write_tokenizer_files
    out = os.path.abspath(args.output)
    max_shard = parse_size(args.max_shard_size)
    check_output(out, args.overwrite)
    tag_dir, meta, kind = master_weights.resolve_tag(args.checkpoint, args.tag)
    config = DebertaConfig.from_dict(meta["model_config"])
    emd = bool((meta.get("run_config") or {}).get("emd", True))
    spm = find_tokenizer(meta, args.tokenizer)
    dtype = getattr(torch, DTYPES[args.dtype])
    rtd = meta.get("objective") == "rtd"
    if rtd:
        from pipeline.release.rtd import rtd_layout, write_rtd_release
        generator_config = DebertaConfig.from_dict(meta["generator_config"])
        layout = rtd_layout(config, generator_config, meta["embedding_sharing"], emd)
    else:
        layout = mlm_layout(config, emd)
    tensors = master_weights.master_tensors(tag_dir, kind, config, meta["mode"], dict(layout), args.source)
    started = time.time()
    print(f"convert: {tag_dir} ({kind}, mode {meta['mode']}, step {meta.get('step')}) -> {out} ({args.dtype})",
          file=sys.stderr)
    with staged_directory(out, replace=args.overwrite) as tmp:
        if rtd:  # the v3 layout: the discriminator, and the generator beside it
            count, nbytes = write_rtd_release(tensors, config, generator_config, meta["embedding_sharing"], emd, tmp,
                                              dtype, max_shard, tag_dir)
        else:
            count, nbytes, _ = write_tensors(tmp, layout, tensors, dtype, max_shard, tag_dir)
            write_config(tmp, config, "mlm", dtype)
        seconds = time.time() - started
        write_tokenizer_files(tmp, spm)
        if args.verify:
            verify(tmp, emd, task="base" if rtd else "mlm")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"convert: wrote {count} tensors, {nbytes / 1e9:.3f} GB in {seconds:.1f} s "
          f"({count / max(seconds, 1e-9):.1f} tensors/s, {nbytes / 1e9 / max(seconds, 1e-9):.3f} GB/s); "
          f"peak RSS {peak:.2f} GiB", file=sys.stderr)
    return out
