"""One layer's disentangled attention at the 1.5B's shape (hidden 1536, 24 heads of 64, 256 position buckets),
bf16, no dropout, per path and sequence length: forward + backward and forward alone (ms, CUDA events, median
of --reps after 2 warm-up calls), the peak memory above what the inputs hold, and the output's relative max
|difference| against the first path listed. Needs CUDA.

    python -m bench.attention --lengths 512 --paths sdpa,fused
    python -m bench.attention --lengths 2048,4096,8192 --paths fused,disentangled-flash,flashdeberta

Paths: ours (attention_impl: math, eager, sdpa, fused); `transformers` (transformers' DisentangledSelfAttention);
`disentangled-flash` (PyPI disentangled-flash: TritonTrainingDisentangledSelfAttention) and `flashdeberta` (PyPI
flashdeberta: FlashDisentangledSelfAttention), built from the same config and loaded with our layer's weights
(transformers' keys). A path that cannot run (a package not installed, a shape it refuses, out of memory) is a
row saying why; the others still run. Batch: --tokens per batch (default 8192: 16 x 512, 4 x 2048, 2 x 4096,
1 x 8192). Paths run one after the other, each over every length (one slow to start, e.g. autotuning its
kernels, delays only itself); each row goes to --json as soon as it is measured, so a run cut short keeps what
it has.
"""
import argparse
import statistics
import sys

import torch

from model import preset
from model.attention import DisentangledSelfAttention, relative_position_index
from model.fast import convert
from pipeline.cli import Parser
from pipeline.cli_types import at_least, names_from, positive_int
from pipeline.io import atomic_json

OURS = ("math", "eager", "sdpa", "fused")
PATHS = OURS + ("transformers", "disentangled-flash", "flashdeberta")


def lengths(text):
    """--lengths: comma-separated sequence lengths, each at least 16."""
    return [at_least(16)(n) for n in text.split(",")]


def parse_args(argv=None):
    p = Parser(prog="python -m bench.attention", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=lengths, default=[512],
                   help="comma-separated sequence lengths (default 512)")
    p.add_argument("--paths", type=names_from(PATHS), default=["sdpa", "fused"],
                   help=f"comma-separated, from {','.join(PATHS)}; the first is the reference (default sdpa,fused)")
    p.add_argument("--tokens", type=positive_int, default=8192, help="tokens per batch (default 8192)")
    p.add_argument("--reps", type=positive_int, default=5, help="timed calls per measurement (default 5)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p.parse_args(argv)


def layer(path, config, state):
    """(module, call(hidden, token_mask, rel_index, rel_embeddings) -> [B, N, hidden]) for one path."""
    if path in OURS:
        module = convert.apply(DisentangledSelfAttention(config), path)
        module.load_state_dict(state)
        return module, lambda h, mask, rel_index, rel: module(h, None, rel_index, rel)  # no padding: no mask
    from transformers import DebertaV2Config
    theirs = DebertaV2Config(**config.to_dict())
    if path == "transformers":
        from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention as Theirs
        module = Theirs(theirs)
        call = lambda h, mask, rel_index, rel: module(h, mask[:, None, None, :] & mask[:, None, :, None],  # noqa: E731
                                                      relative_pos=None, rel_embeddings=rel)[0]
    elif path == "disentangled-flash":
        from disentangled_flash.training import TritonTrainingDisentangledSelfAttention
        module = TritonTrainingDisentangledSelfAttention(theirs, assume_unpadded=True)
        call = lambda h, mask, rel_index, rel: module(h, mask, rel_embeddings=rel)[0]  # noqa: E731
    else:
        from flashdeberta.model import FlashDisentangledSelfAttention
        module = FlashDisentangledSelfAttention(theirs)
        call = lambda h, mask, rel_index, rel: module(h, mask, relative_pos=None, rel_embeddings=rel)[0]  # noqa: E731
    module.load_state_dict(state, strict=True)
    return module, call


def cuda_ms(fn, reps):
    """Median milliseconds of fn() over `reps` calls after 2 warm-up calls (CUDA events around each call)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(path, config, state, inputs, reference, reps):
    """One row: fwd+bwd ms, fwd ms, peak GB above the inputs, relative difference against `reference`."""
    hidden, mask, rel_index, rel, grad = inputs
    module, call = layer(path, config, state)
    module.to("cuda", torch.bfloat16)
    with torch.no_grad():
        out = call(hidden, mask, rel_index, rel.detach()).float()
    if reference is None:
        difference = "reference"
    elif out.shape != reference.shape:
        difference = f"shape {tuple(out.shape)}, not {tuple(reference.shape)}"
    else:
        difference = ((out - reference).abs().max() / reference.abs().max()).item()
    module.train()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_ms = cuda_ms(lambda: call(hidden, mask, rel_index, rel).backward(grad), reps)
    peak_gb = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    module.eval()
    with torch.no_grad():
        forward_ms = cuda_ms(lambda: call(hidden, mask, rel_index, rel), reps)
    hidden.grad = rel.grad = None
    return dict(fwd_bwd_ms=train_ms, fwd_ms=forward_ms, peak_gib=peak_gb, difference=difference), out


def length_inputs(config, N, tokens):
    B = max(1, tokens // N)
    torch.manual_seed(0)
    D = config.hidden_size
    hidden = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rel = torch.randn(2 * config.att_span, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(B, N, dtype=torch.bool, device="cuda")
    grad = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16)
    return B, (hidden, mask, relative_position_index(N, N, config, device="cuda"), rel, grad)


def fmt(value, spec):
    return format(value, spec) if isinstance(value, float) else str(value)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: python -m bench.attention needs CUDA (torch.cuda.is_available() is False)")
    config = preset("xxlarge", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    state = DisentangledSelfAttention(config).state_dict()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; one 1.5B attention layer, bf16, no dropout, "
          f"{args.tokens} tokens per batch; difference: relative max |out - {args.paths[0]}'s out|")
    print(f"{'L':>5} {'B':>3} {'path':19} {'fwd+bwd ms':>10} {'fwd ms':>8} {'peak GiB':>8}  difference", flush=True)
    rows, references = [], {}  # references: the first path's output at each length
    for path in args.paths:  # path by path: a path that is slow to start (autotuning) delays only itself
        for N in args.lengths:
            B, inputs = length_inputs(config, N, args.tokens)
            row = dict(length=N, batch=B, path=path)
            try:
                result, out = measure(path, config, state, inputs, references.get(N), args.reps)
                references.setdefault(N, out)
                row.update(result)
                print(f"{N:5d} {B:3d} {path:19} {result['fwd_bwd_ms']:10.2f} {result['fwd_ms']:8.2f} "
                      f"{result['peak_gib']:8.2f}  {fmt(result['difference'], '.2e')}", flush=True)
            except Exception as error:  # a path that cannot run is a result; the others still run
                row["failed"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                print(f"{N:5d} {B:3d} {path:19} failed: {row['failed']}", flush=True)
            rows.append(row)
            del inputs
            torch.cuda.empty_cache()
            if args.json:
                atomic_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
