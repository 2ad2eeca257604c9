"""The full 1.5B (xxlarge) forward, ours against transformers' DebertaV2Model on the same random weights.

transformers builds and initialises the model; ours is built on the meta device and takes transformers'
tensors themselves (keys mapped by model/state_dict_adapter.py, then a strict load with assign=True: every
key present, every shape equal), so the weights exist once: about 6.5 GB of RAM in fp32 instead of 13.
Prints the largest difference of the last hidden state on valid (unpadded) tokens.

    .venv/bin/python bench/parity_1p5b.py                 # CPU, fp32, 1 x 128 tokens: a few minutes
    .venv/bin/python bench/parity_1p5b.py --device cuda
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import DebertaModel, preset  # noqa: E402
from model import state_dict_adapter as keys  # noqa: E402
from model.fast import convert  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--pad-from", type=int, default=100,
                   help="the last sequence is padded from this position on, to exercise the mask (default 100)")
    p.add_argument("--attention-impl", default="eager", choices=["math", "eager", "sdpa"],
                   help="our attention path: math (the plain formula), eager or sdpa (default eager)")
    p.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick try (default: all 48)")
    p.add_argument("--seed", type=int, default=0, help="weights and input seed (default 0)")
    return p.parse_args()


def main():
    args = parse_args()
    import transformers
    overrides = dict(attention_impl=args.attention_impl)
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    config = preset("xxlarge", **overrides)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with torch.device(args.device):  # initialise where it runs: no second copy on the way
        theirs = transformers.DebertaV2Model(transformers.DebertaV2Config(**config.to_dict())).eval()
    print(f"transformers' model built in {time.perf_counter() - start:.0f} s", flush=True)

    with torch.device("meta"):
        ours = DebertaModel(config)
    state = keys.from_release_state(theirs.state_dict())  # transformers' keys -> ours (release layout)
    expected = {keys.to_release(k, "base") for k in ours.state_dict()}
    own = {keys.to_model(k, "base"): state[k] for k in expected if k in state}
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise SystemExit(f"transformers has keys ours lacks: {unexpected[:10]}")
    ours.load_state_dict(own, strict=True, assign=True)  # strict: every key; shapes are checked too
    convert.apply(ours, config.attention_impl)
    ours.eval()
    del state, own, expected
    print(f"{sum(p.numel() for p in ours.parameters()):,} parameters, the same tensors as transformers' model", flush=True)

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(4, config.vocab_size, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    if args.pad_from < args.seq:
        mask[-1, args.pad_from:] = 0
        ids[-1, args.pad_from:] = 0
    ids, mask = ids.to(args.device), mask.to(args.device)
    with torch.no_grad():
        start = time.perf_counter()
        a = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        t_theirs = time.perf_counter() - start
        start = time.perf_counter()
        b = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        t_ours = time.perf_counter() - start
    valid = mask.bool()
    diff = (a - b)[valid].abs().max().item()
    print(f"xxlarge ({config.num_hidden_layers} layers), {args.device}, fp32, {args.batch} x {args.seq} tokens "
          f"({int(valid.sum())} valid), attention_impl {args.attention_impl}")
    print(f"forward: transformers {t_theirs:.1f} s, ours {t_ours:.1f} s")
    print(f"max |ours - transformers| on valid tokens: {diff:.3e} (largest |value| {a[valid].abs().max().item():.2f})")
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
