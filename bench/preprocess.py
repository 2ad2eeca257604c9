"""Preprocessing and loader throughput.

  python -m bench.preprocess [--work DIR] [--vocab-size 8000] [--scale 10]

Prints: raw sentencepiece tokens/s (one process, same text, the model's own normalizer), `preprocess`
tokens/s with 1 and 2 workers (ratio to raw per worker), the peak RSS of `preprocess` on the corpus and on
the corpus repeated --scale times (should be flat), and the loader's masked samples/s.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from pipeline.cli import Parser
from pipeline.cli_types import at_least, positive_int
from pipeline.data import corpus, tokenizer
from pipeline.data.mlm_loader import build_pretrain_loader
from tests.helpers.launch import ROOT, run_env

# `deberta-ds preprocess` (pipeline/data/preprocess.py) in a process of its own, its options parsed by the
# command's own parser (every other option at the command's default); the checkout comes first on PYTHONPATH
CHILD = """
import json, resource, sys, time, argparse
from pipeline.data import preprocess
parser = argparse.ArgumentParser()
preprocess.add_arguments(parser)
args = parser.parse_args(json.loads(sys.argv[1]))
start = time.perf_counter()
preprocess.preprocess(args, 0, 1)
seconds = time.perf_counter() - start
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak / 1024}))
"""


def run_preprocess(files, spm_path, out_dir, workers):
    args = ["--input", *files, "--tokenizer", spm_path, "--output-dir", out_dir, "--max-seq-len", "512",
            "--workers", str(workers), "--max-line-bytes", str(1 << 24), "--no-progress"]
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT,
                            env=run_env(cpu=False, threads=None), check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


def copies(files, times, directory):
    """The corpus repeated `times` times, as distinct files (the same name twice would be read once)."""
    import shutil

    os.makedirs(directory, exist_ok=True)
    out = []
    for copy in range(times):
        for path in files:
            target = os.path.join(directory, f"{copy:03d}-{os.path.basename(path)}")
            shutil.copy(path, target)
            out.append(target)
    return out


def raw_sentencepiece(spm_path, files):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_path)
    lines = [line.rstrip("\n") for f in files for line in open(f, encoding="utf-8") if line.strip()]
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in sp.encode(lines, num_threads=1))
    return tokens, time.perf_counter() - start


def main():
    parser = Parser(prog="python -m bench.preprocess", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--vocab-size", type=at_least(200), default=8000, help="tokenizer size (default %(default)s)")
    parser.add_argument("--scale", type=positive_int, default=10,
                        help="corpus repetitions for the RSS test (default %(default)s)")
    options = parser.parse_args()
    work = options.work or tempfile.mkdtemp(prefix="bench-preprocess-")
    files = [str(p) for p in corpus.write_corpus(os.path.join(work, "corpus"))]
    texts = (line for f in files for line in open(f, encoding="utf-8"))
    spm_path = tokenizer.train(texts, os.path.join(work, "spm"), vocab_size=options.vocab_size, num_threads=2)

    big = copies(files, options.scale, os.path.join(work, "corpus-big"))
    tokens, seconds = raw_sentencepiece(spm_path, big)
    raw_rate = tokens / seconds
    print(f"corpus: {sum(os.path.getsize(f) for f in big) / 1e6:.1f} MB, {tokens} tokens")
    print(f"raw sentencepiece (1 thread):   {raw_rate / 1e6:.2f} M tokens/s")
    for workers in (1, 2):
        result = run_preprocess(big, spm_path, os.path.join(work, f"shards-w{workers}"), workers)
        rate = tokens / result["seconds"]
        print(f"preprocess --workers {workers}:      {rate / 1e6:.2f} M tokens/s "
              f"({rate / raw_rate / workers:.2f}x raw per worker), peak RSS {result['peak_rss_mib']:.0f} MiB")
    small = run_preprocess(files, spm_path, os.path.join(work, "shards-small"), 2)
    print(f"peak RSS, --workers 2: 1x corpus {small['peak_rss_mib']:.0f} MiB, "
          f"{options.scale}x corpus {result['peak_rss_mib']:.0f} MiB")

    loader = build_pretrain_loader(os.path.join(work, "shards-w1"), spm_path, 32, 0, 1, seed=0)
    iterator = iter(loader)
    next(iterator)
    start, batches = time.perf_counter(), 20
    for _ in range(batches):
        next(iterator)
    rate = batches * 32 / (time.perf_counter() - start)
    print(f"loader (masking, 512 tokens, 1 process): {rate:.0f} samples/s")


if __name__ == "__main__":
    main()
