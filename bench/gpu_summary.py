"""The one table that ends bench/gpu_checks.sh: what each part of the run showed, read from the files the parts
left in OUT (so a part that failed or ran out of time shows as such, with what it had written).

    python -m bench.gpu_summary OUT          (bench/gpu_checks.sh runs it last; it needs no GPU)

OUT/parts.tsv       one line per part the script ran: name, exit code, seconds (124: its time limit)
OUT/NAME.txt        each part's output
OUT/gpu_tests.xml   the GPU tests' JUnit report (pytest -m gpu tests/gpu)
OUT/train_step.json bench/train_step.py --json: ours' training step (MFU)
OUT/pretrain_xxlarge/metrics.jsonl   `deberta-ds pretrain` of the 1.5B (tokens/s, MFU)
OUT/attention_512.json, OUT/attention_long.json   bench/attention.py --json rows
"""
import argparse
import json
import os
import statistics
import sys
import xml.etree.ElementTree as ElementTree

from pipeline.cli import Parser

PARTS = {  # name in parts.tsv -> what the part shows; the default parts first
    "data": "shards of the demo corpus for pretrain (only built when missing)",
    "tests": "GPU tests: fused vs math (fp32, 1e-4), fused vs sdpa (bf16), relative-bias kernels, dropout, "
             "1.5B forward vs transformers",
    "step": "ours' training step, 1.5B, bf16, batch 16 x 512 (MLM + EMD, AdamW)",
    "pretrain": "deberta-ds pretrain, 1.5B, --deepspeed auto, bf16, 1 GPU, 16 x 512 per step",
    "attention_512": "one 1.5B attention layer, fwd+bwd, L=512: fused vs sdpa",
    "attention_long": "one 1.5B attention layer, fwd+bwd, L=2048-8192: fused vs flashdeberta, disentangled-flash",
}
OPTIONAL = {"profile": "kernel tables of a 1.5B step", "vs_transformers": "steps against transformers, 1.5B, bf16",
            "fp16": "fp16 with dynamic loss scaling", "zero": "the 1.5B step by ZeRO stage",
            "finetune": "fine-tuning the 1.5B against transformers.Trainer"}


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tests_result(out):
    try:
        root = ElementTree.parse(os.path.join(out, "gpu_tests.xml")).getroot()
    except (OSError, ElementTree.ParseError):
        return "no report"
    cases = list(root.iter("testcase"))
    problems = [(c.get("name"), c.find("failure") if c.find("failure") is not None else c.find("error")) for c in cases]
    failed = [(name, problem.get("message") or "") for name, problem in problems if problem is not None]
    if not failed:
        return f"{len(cases)} of {len(cases)} passed"
    names = ", ".join(name for name, _ in failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
    return (f"{len(cases) - len(failed)} of {len(cases)} passed; failed: {names}; the first: "
            f"{failed[0][1].splitlines()[0][:160] if failed[0][1] else '(no message)'}")


def step_result(out):
    data = read_json(os.path.join(out, "train_step.json"))
    try:
        r = data["results"]["train_bf16"]["ours_emd"]
    except (TypeError, KeyError):
        return "no result"
    return f"{r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']:.1%}, peak {r['peak_gb']:.1f} GB"


def pretrain_result(out):
    try:
        with open(os.path.join(out, "pretrain_xxlarge", "metrics.jsonl"), encoding="utf-8") as f:
            logged = [r for r in map(json.loads, f) if "tokens_per_s" in r][1:]  # the first holds the warm-up
    except (OSError, ValueError):
        return "no metrics"
    if not logged:
        return "no logged interval after the first"
    mfu = [r["mfu"] for r in logged if "mfu" in r]
    return (f"{statistics.median(r['tokens_per_s'] for r in logged):.0f} tokens/s"
            + (f", MFU {statistics.median(mfu):.1%}" if mfu else ", no MFU (peak unknown)")
            + f" (median of {len(logged)} intervals)")


def attention_result(out, name):
    rows = read_json(os.path.join(out, f"{name}.json"))
    if not rows:
        return ["no rows"]
    lines = []
    for length in sorted({r["length"] for r in rows}):
        cells = []
        for r in (r for r in rows if r["length"] == length):
            if "failed" in r:
                cells.append(f"{r['path']} failed ({r['failed'][:60]})")
            else:
                difference = r["difference"] if isinstance(r["difference"], str) else f"diff {r['difference']:.1e}"
                cells.append(f"{r['path']} {r['fwd_bwd_ms']:.1f} ms, {r['peak_gib']:.1f} GiB, {difference}")
        batch = next(r["batch"] for r in rows if r["length"] == length)
        lines.append(f"L={length} B={batch}: " + "; ".join(cells))
    return lines


def results(out, name):
    if name in OPTIONAL or name == "data":
        return [f"see {name}.txt"]
    if name == "tests":
        return [tests_result(out)]
    if name == "step":
        return [step_result(out)]
    if name == "pretrain":
        return [pretrain_result(out)]
    return attention_result(out, name)


def table(out):
    ran = {}
    try:
        with open(os.path.join(out, "parts.tsv"), encoding="utf-8") as f:
            for line in f:
                name, code, seconds = line.split()
                ran[name] = (int(code), float(seconds))
    except OSError:
        pass
    lines = ["| part | what it shows | result | status |", "|---|---|---|---|"]
    for name, what in list(PARTS.items()) + [(n, w) for n, w in OPTIONAL.items() if n in ran]:
        if name not in ran:
            lines.append(f"| {name} | {what} | - | not run |")
            continue
        code, seconds = ran[name]
        status = "ok" if code == 0 else ("time limit" if code == 124 else f"failed (exit {code})")
        for n, result in enumerate(results(out, name)):
            lines.append(f"| {name if n == 0 else ''} | {what if n == 0 else ''} | {result} | "
                         f"{f'{status}, {seconds:.0f} s' if n == 0 else ''} |")
    return "\n".join(lines)


def main(argv=None):
    p = Parser(prog="python -m bench.gpu_summary", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the directory bench/gpu_checks.sh wrote its parts' files to")
    args = p.parse_args(argv)
    if not os.path.isdir(args.out):
        sys.exit(f"error: {args.out}: no such directory")
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
