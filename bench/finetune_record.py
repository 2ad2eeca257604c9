"""The cost of ReCoRD in fine-tuning: rows (features) per query and the time of one epoch, for this tree and,
with --before-tree DIR, another checkout.

    python -m bench.finetune_record [--before-tree /tmp/bench-before] [--json OUT]
    ... --quick: 12 queries, 1 epoch, 1 round (a smoke run)

ReCoRD-like data (official ReCoRD jsonl: passage text with "@highlight" lines, entity spans with inclusive
ends, queries with @placeholder, answers with spans; candidate entities per query lognormal with median 12 and
sigma 0.35, 2 to 23: mean about 12.7, as measured; words of passage and query lognormal through the measured
percentiles, tests/helpers/superglue.py). For the current tree, and with --before-tree DIR for another checkout
(run with cwd=DIR and PYTHONPATH=DIR), it counts the rows (features) task.build_features makes per query, in a
subprocess with that tree, and times one epoch of `deberta-ds finetune --task ReCoRD` (the epoch's "train_s",
as bench/finetune_compare.py reads it; both trees start from the same MLM release).

Bad input is one line; a run that fails shows as failed in the table (with its log) and the bench exits 1.
No timing is asserted. Shared pieces: bench/finetune_common.py; the data: tests/helpers/superglue.py.
"""
import json
import os
import shutil
import statistics
import sys

from bench.finetune_common import (ROOT, add_common_arguments, child_env, fill_defaults, fmt_loss, last_line,
                                   ours_command, ours_epochs, parser, ratio, run_bench, run_logged, setup)

NORMAL = dict(train_examples=64, val_examples=16, epochs=1, rounds=1)
QUICK = dict(train_examples=12, val_examples=8, epochs=1, rounds=1)


def parse_args(argv=None):
    p = parser("python -m bench.finetune_record", __doc__)
    p.add_argument("--before-tree", default=None,
                   help="another checkout (e.g. `git worktree add /tmp/bench-before d199d30`) to compare with")
    add_common_arguments(p, dict(NORMAL, max_seq_len=512))  # 512: the ReCoRD preset's
    args = fill_defaults(p.parse_args(argv), p, NORMAL, QUICK)
    if args.before_tree:
        args.before_tree = os.path.abspath(args.before_tree)
        if not os.path.isfile(os.path.join(args.before_tree, "pipeline", "cli.py")):
            p.error(f"--before-tree {args.before_tree}: not a checkout of this project (no pipeline/cli.py)")
    return args


COUNT_ROWS = """
import json, sys
from pipeline.data.tokenizer import Tokenizer
from pipeline.finetune.tasks import get_task
task = get_task("ReCoRD")
examples = task.load("train", sys.argv[1])
features = task.build_features(examples, Tokenizer(sys.argv[2]), int(sys.argv[3]))
tokens = sum(len(f["input_ids"]) for f in features if "input_ids" in f)
print(json.dumps({"kind": task.kind, "queries": len(examples), "features": len(features), "tokens": tokens}))
"""


def count_rows(args, tree, data_dir, spm, log):
    """len(features) / len(examples) of ReCoRD's training split, by `tree`'s own build_features."""
    cmd = [sys.executable, "-c", COUNT_ROWS, data_dir, spm, str(args.max_seq_len)]
    code, _, _, _ = run_logged(cmd, log, child_env(args, tree), cwd=tree)
    if code != 0:
        return {"failed": f"exit {code}: {last_line(log)}", "log": log}
    return json.loads(last_line(log))


def record(args, work, emit):
    data_dir, spm = setup(args, work, ["ReCoRD"])
    trees = [("after", ROOT)] + ([("before", args.before_tree)] if args.before_tree else [])
    emit(record_header(args, work, data_dir))
    results = {}
    for name, tree in trees:
        out = os.path.join(work, "runs", f"ReCoRD-{name}")
        os.makedirs(out, exist_ok=True)
        rows = count_rows(args, tree, data_dir, spm, os.path.join(out, "count.log"))
        timings = []
        for run_no in range(args.rounds):
            run_out = os.path.join(out, f"run{run_no}")
            shutil.rmtree(run_out, ignore_errors=True)
            cmd = ours_command(args, "ReCoRD", os.path.join(work, "release_mlm"), data_dir, run_out, sift=False, tree=tree)
            code, wall, rss, gpu = run_logged(cmd, os.path.join(out, f"run{run_no}.log"), child_env(args, tree), cwd=tree)
            if code != 0:
                timings.append({"failed": f"exit {code}: {last_line(os.path.join(out, f'run{run_no}.log'))}",
                                "log": os.path.join(out, f"run{run_no}.log")})
                continue
            epochs = ours_epochs(run_out)
            shutil.rmtree(os.path.join(run_out, "best"), ignore_errors=True)
            timings.append({"train_s": sum(e["train_s"] for e in epochs), "approx": any(e["approx"] for e in epochs),
                            "wall_s": wall, "peak_rss_bytes": rss, "peak_gpu_mib": gpu,
                            "train_loss": epochs[0]["train_loss"]})
        results[name] = {"tree": tree, "rows": rows, "runs": timings}
        emit(f"  {name} ({tree}): " + ("rows FAILED " + rows["failed"] if "failed" in rows else
             f"{rows['features'] / rows['queries']:.2f} rows per query") + "; " +
             ", ".join(f"{t['train_s']:.1f} s" if "train_s" in t else f"FAILED {t['failed']}" for t in timings))
    emit(record_table(results))
    return {"results": results}


def record_header(args, work, data_dir):
    with open(os.path.join(data_dir, "ReCoRD", "train.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    candidates = sorted(len({p["passage"]["text"][e["start"]:e["end"] + 1] for e in p["passage"]["entities"]})
                        for p in lines)
    words = sorted(len(p["passage"]["text"].split()) + len(p["qas"][0]["query"].split()) for p in lines)
    return (f"ReCoRD-like data: {len(lines)} train queries ({args.val_examples} val), candidate entities per query "
            f"mean {statistics.fmean(candidates):.1f}, median {statistics.median(candidates)}, max {candidates[-1]}; "
            f"words (passage + query) median {statistics.median(words)}\n"
            f"model {args.model}, batch {args.batch_size}, max_seq_len {args.max_seq_len}, lr {args.lr}, "
            f"{args.epochs} epoch(s), DeepSpeed config {os.path.relpath(args.ds_path, ROOT)}, {args.rounds} round(s), "
            f"load average {os.getloadavg()[0]:.2f}")


def record_table(results):
    head = ["tree", "head kind", "rows per query", "tokens per query", "epoch train s", "x after", "peak RSS GB",
            "loss ep1"]
    lines = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    after = median_time(results.get("after", {}).get("runs", []))
    approx = False
    for name, r in results.items():
        rows = r["rows"]
        good = [t for t in r["runs"] if "train_s" in t]
        approx |= any(t["approx"] for t in good)
        per_query = f"{rows['features'] / rows['queries']:.2f}" if "features" in rows else f"failed: {rows['failed'][:80]}"
        tokens = f"{rows['tokens'] / rows['queries']:.0f}" if rows.get("tokens") else "-"
        seconds = median_time(r["runs"])
        time_cell = (f"{seconds:.1f}{'~' if any(t['approx'] for t in good) else ''}" if seconds is not None else
                     f"failed: {r['runs'][-1]['failed'][:80]} (log {r['runs'][-1]['log']})")
        rss = f"{statistics.median(t['peak_rss_bytes'] for t in good) / 1e9:.2f}" if good else "-"
        loss = fmt_loss(statistics.median(t["train_loss"] for t in good)) if good else "-"
        lines.append("| " + " | ".join([name, rows.get("kind", "-"), per_query, tokens, time_cell,
                                        ratio(seconds, after), rss, loss]) + " |")
    if approx:
        lines.append("~: no per-epoch train_s in that tree's metrics.json: elapsed_s (training + the val evaluation "
                     "+ the best-model save)")
    return "\n".join(lines)


def median_time(timings):
    good = [t["train_s"] for t in timings if "train_s" in t]
    return statistics.median(good) if good else None


def main(argv=None, emit=print):
    return run_bench(parse_args(argv), "bench.finetune_record", record, emit)


if __name__ == "__main__":
    sys.exit(main())
