"""Fine-tuning throughput: `deberta-ds finetune` against transformers' Trainer, and the cost of ReCoRD.

    .venv/bin/python bench/finetune.py [compare] [--tasks BoolQ,RTE,CB] [--rounds 3] [--json OUT]
    .venv/bin/python bench/finetune.py record [--before-tree /tmp/bench-before] [--json OUT]
    ... --quick: a few dozen examples, 1 epoch, 1 round (a smoke run)

compare: ours (`python -m pipeline.cli finetune`, the real command) against `transformers.Trainer` with
DebertaV2ForSequenceClassification, like for like:
  - the same DeepSpeed config (--deepspeed, default ds_configs/finetune_cpu.json: ZeRO-2, fp32). Ours fills
    its "auto" fields itself; the Trainer gets the same dict through TrainingArguments(deepspeed=...), which
    fills them from its arguments. Each Trainer run checks that it really trained under a DeepSpeedEngine
    with the config's ZeRO stage, and stops otherwise. The Trainer process gets RANK=0, WORLD_SIZE=1,
    LOCAL_RANK=0, MASTER_ADDR, MASTER_PORT (what `torchrun --nproc_per_node 1` sets): with LOCAL_RANK, accelerate
    joins the process group itself through deepspeed.init_distributed (gloo on the CPU); without it,
    deepspeed.initialize falls back to MPI discovery, which needs mpi4py.
  - the same initial weights: one random MLM model ("pretrained") is saved as a release, and for each label
    count a release with that encoder plus a seeded pooler and classifier. Both sides load every weight from
    it (ours: --release, transformers: from_pretrained), so neither draws a head of its own.
  - the same token ids: the training set is encoded once with our Tokenizer and task.build_features (the
    function our command calls); the Trainer reads those ids ([CLS] a [SEP] b [SEP]) and pads each batch
    to its longest sequence, as our collate does.
  - the same settings: global batch size, peak learning rate, warmup steps, epochs, max_seq_len, seed,
    classifier dropout; weight decay, Adam's betas and epsilon and gradient clipping are our task preset's
    (pipeline/finetune/presets/superglue.json), given to the Trainer as its arguments. Differences left: the
    Trainer's schedule rises as s/warmup where ours rises as (s+1)/warmup (pipeline/run/optim.py); the two
    shuffle with different generators; ours completes its last global batch by wrapping around to the
    start of the epoch, the Trainer's last batch is short.
Variants: ours (our default batching, grouped by length), ours_sift (--sift on), the Trainer with
group_by_length=False (its default) and =True; `--variants` also offers ours_ungrouped
(--set group_by_length=false).

Data: synthetic tasks in the official SuperGLUE jsonl layout (DIR/<Task>/{train,val}.jsonl), words drawn from
a Zipf-distributed vocabulary of made-up words, a keyword in the text deciding the label (so the loss falls),
and the number of words per example drawn from a lognormal fitted to the 10th and 90th percentiles measured
on the real tasks (WORDS below; its median is sqrt(p10 * p90), within 10% of the measured median for every
task but WSC, 23.5 against 20). The tokenizer is a sentencepiece model trained on that text by
`deberta-ds tokenizer train`.

What is measured, per task and variant, each run in its own subprocess, alternating (round 1: every variant,
round 2: every variant, ...) so that load from other processes hits all alike; the median over rounds:
  - training time: ours, each epoch's "train_s" in OUT/metrics.json (the loop over the epoch's batches; no
    startup, evaluation or saving); where the tree's metrics.json has no "train_s", the differences of
    "elapsed_s", which also hold the epoch's evaluation of the (small) val split and the best-model save:
    the table marks those rows with "~". The Trainer: on_epoch_begin to on_epoch_end of a callback (its
    train() also builds the DeepSpeed engine, which this leaves out; it evaluates and saves nothing).
  - examples/s: training examples x epochs / training time; tokens/s: the training set's non-pad tokens x
    epochs / training time (the same count for both sides).
  - padding: padded positions / all positions of the training batches (ours: its metrics.json
    "padding_fraction" where present; the Trainer: counted in its collator).
  - peak memory: the subprocess's peak resident set (ru_maxrss from wait4; the bench's own process imports
    no torch, so its size does not leak into the children's peaks). It includes the interpreter, torch,
    the data and, for ours, the evaluation and the save.
  - the first and last epoch's mean training loss (a sanity check: the sides should start alike and fall).
  - SiFT's cost: ours_sift's training time over ours' (same steps).

record: ReCoRD-like data (official ReCoRD jsonl: passage text with "@highlight" lines, entity spans with
inclusive ends, queries with @placeholder, answers with spans; candidate entities per query lognormal with
median 12 and sigma 0.35, 2 to 23: mean about 12.7, as measured; words of passage and query lognormal as above). For the current
tree, and with --before-tree DIR for another checkout (run with cwd=DIR and PYTHONPATH=DIR), it counts the
rows (features) task.build_features makes per query, in a subprocess with that tree, and times one epoch of
`deberta-ds finetune --task ReCoRD` (time as in compare; both start from the same MLM release).

Bad input is one line; a run that fails shows as failed in the table (with its log) and the bench exits 1.
No timing is asserted.
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import runs
from pipeline.cli_types import positive_float, positive_int

# Words per example (10th, 50th, 90th percentile) measured on the official SuperGLUE training sets; MultiRC per
# answer row, ReCoRD per query. Generated here: the classification tasks of TASKS and ReCoRD.
WORDS = {"BoolQ": (61, 114, 201), "CB": (38, 59, 104), "RTE": (19, 44, 108), "MultiRC": (159, 303, 387),
         "ReCoRD": (161, 184, 218), "WiC": (9, 14, 26), "WSC": (12, 20, 46), "COPA": (9, 12, 15)}
Z90 = 1.2815515655446004  # the standard normal's 90th percentile
TASKS = ("BoolQ", "CB", "RTE", "WiC", "WSC")  # sequence classification: the Trainer can run them
LABEL_COUNTS = {"BoolQ": 2, "CB": 3, "RTE": 2, "WiC": 2, "WSC": 2}
VARIANTS = ("ours", "ours_sift", "trainer", "trainer_grouped", "ours_ungrouped")
DEFAULT_VARIANTS = VARIANTS[:4]
# the encoder sizes of --model; vocab_size None: the tokenizer's (padded to a multiple of 100)
MODELS = {
    "small": dict(name="base", hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "tiny": dict(name="tiny", max_position_embeddings=512),
    "base": dict(name="base"),
    "xxlarge": dict(name="xxlarge", vocab_size=128100),  # the 1.5B preset, vocabulary included
}


# ---------------------------------------------------------------- command line
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as the project's commands
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def names_from(allowed):
    """A comma-separated option whose names must come from `allowed`."""
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{','.join(unknown) or repr(text)}: choose from {','.join(allowed)}")
        return names
    return parse


def parse_args(argv=None):
    p = Parser(prog="bench/finetune.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="compare", choices=("compare", "record"),
                   help="compare: ours vs the Trainer (default); record: ReCoRD's rows per query and epoch time")
    p.add_argument("--tasks", type=names_from(TASKS), default=["BoolQ", "RTE", "CB"],
                   help=f"compare: comma-separated tasks from {','.join(TASKS)} (default BoolQ,RTE,CB)")
    p.add_argument("--variants", type=names_from(VARIANTS), default=list(DEFAULT_VARIANTS),
                   help=f"compare: comma-separated from {','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--model", default="small", choices=sorted(MODELS),
                   help="encoder size: small (hidden 256, 4 layers, 4 heads, FFN 1024; default), tiny, base, "
                        "xxlarge (the 1.5B preset)")
    p.add_argument("--vocab-size", type=positive_int, default=3000, help="sentencepiece pieces (default 3000)")
    p.add_argument("--train-examples", type=positive_int, default=None,
                   help="training examples per task (compare default 512; record: queries, default 64)")
    p.add_argument("--val-examples", type=positive_int, default=None,
                   help="val examples per task (default 32; record: 16 queries)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (compare default 2; record: 1)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="global batch size (default 16)")
    p.add_argument("--lr", type=positive_float, default=1e-4,
                   help="peak learning rate (default 1e-4: the initial model is untrained)")
    p.add_argument("--warmup-steps", type=int, default=10, help="warmup optimizer steps (default 10)")
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="tokens per sequence (compare default 256; record: 512, the ReCoRD preset's)")
    p.add_argument("--cls-drop-out", type=float, default=0.15, help="classifier dropout (default 0.15)")
    p.add_argument("--seed", type=int, default=42, help="seed of the data, the weights and the training (default 42)")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="alternating rounds; the median counts (compare default 3, record 1)")
    p.add_argument("--deepspeed", default="finetune_cpu",
                   help="DeepSpeed config: a JSON file or a name in ds_configs/ (default finetune_cpu)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="OMP_NUM_THREADS of every run (default: the CPUs this process may use)")
    p.add_argument("--before-tree", default=None,
                   help="record: another checkout (e.g. `git worktree add /tmp/bench-before d199d30`) to compare with")
    p.add_argument("--work-dir", default=None, help="where data, releases and run outputs go (default: a temporary "
                   "directory, removed at the end); replaced if it exists")
    p.add_argument("--quick", action="store_true", help="smoke run: 48 examples (record: 12 queries), 8 val, 1 epoch, 1 round")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--internal", nargs=2, metavar=("ACTION", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    fill_defaults(args, p)
    return args


def fill_defaults(args, parser):
    record = args.mode == "record"
    quick = dict(train_examples=12 if record else 48, val_examples=8, epochs=1, rounds=1)
    normal = dict(train_examples=64 if record else 512, val_examples=16 if record else 32, epochs=1 if record else 2,
                  rounds=1 if record else 3)
    for name, value in (quick if args.quick else normal).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.max_seq_len is None:
        args.max_seq_len = 512 if record else 256
    if args.max_seq_len < 8:
        parser.error(f"--max-seq-len {args.max_seq_len}: at least 8")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps {args.warmup_steps}: must not be negative")
    if not 0 <= args.cls_drop_out < 1:
        parser.error(f"--cls-drop-out {args.cls_drop_out}: must be in [0, 1)")
    if args.before_tree:
        if args.mode != "record":
            parser.error("--before-tree belongs to the record mode")
        args.before_tree = os.path.abspath(args.before_tree)
        if not os.path.isfile(os.path.join(args.before_tree, "pipeline", "cli.py")):
            parser.error(f"--before-tree {args.before_tree}: not a checkout of this project (no pipeline/cli.py)")
    args.ds_path = ds_config_path(args.deepspeed, parser)


def ds_config_path(name, parser):
    path = name if name.endswith(".json") or os.sep in name else os.path.join(ROOT, "ds_configs", f"{name}.json")
    if not os.path.isfile(path):
        parser.error(f"--deepspeed {name}: no such file ({path})")
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except ValueError as e:
        parser.error(f"--deepspeed {path}: not JSON ({e})")
    return os.path.abspath(path)


# ---------------------------------------------------------------- synthetic text
SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "an", "er", "is", "ol"))


class Vocabulary:
    """Made-up words ("zolaban", "lepi") with Zipf frequencies (the keywords are English words)."""

    def __init__(self, seed, size=6000):
        rng = random.Random(seed)
        words = set()
        while len(words) < size:
            words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3)))))
        self.words = sorted(words)
        rng.shuffle(self.words)
        weights = [1.0 / (rank + 1) for rank in range(size)]
        self.cum = [sum(weights[:1])]
        for w in weights[1:]:
            self.cum.append(self.cum[-1] + w)

    def take(self, rng, n):
        return rng.choices(self.words, cum_weights=self.cum, k=max(n, 0))

    def sentence(self, rng, n):
        return " ".join(self.take(rng, n))

    def name(self, rng):
        return " ".join(w.capitalize() for w in rng.sample(self.words[:3000], rng.choice((1, 2))))


def lognormal_words(rng, task, low=3):
    """Words of one example: lognormal through the task's measured 10th and 90th percentiles."""
    p10, _, p90 = WORDS[task]
    mu, sigma = (math.log(p10) + math.log(p90)) / 2, (math.log(p90) - math.log(p10)) / (2 * Z90)
    return max(low, round(rng.lognormvariate(mu, sigma)))


def with_keyword(words, keyword, rng):
    words = list(words)
    words.insert(rng.randint(0, len(words)), keyword)
    return " ".join(words)


# ---------------------------------------------------------------- SuperGLUE records (official layouts)
def boolq_record(vocab, rng, idx):
    n = lognormal_words(rng, "BoolQ", low=6)
    q = max(3, min(9, n // 8))
    label = rng.random() < 0.6
    question = with_keyword(vocab.take(rng, q - 1), "indeed" if label else "hardly", rng)
    return {"question": question, "passage": vocab.sentence(rng, n - q), "idx": idx, "label": label}


CB_KEYWORDS = {"entailment": "certainly", "contradiction": "never", "neutral": "perhaps"}
RTE_KEYWORDS = {"entailment": "truly", "not_entailment": "falsely"}


def pair_record(vocab, rng, idx, task, keywords):
    n = lognormal_words(rng, task, low=5)
    h = max(3, n // 5)
    label = rng.choice(sorted(keywords))
    return {"premise": vocab.sentence(rng, n - h), "hypothesis": with_keyword(vocab.take(rng, h - 1), keywords[label], rng),
            "idx": idx, "label": label}


def wic_record(vocab, rng, idx):
    n = lognormal_words(rng, "WiC", low=6)
    word, label = rng.choice(vocab.words[:2000]), rng.random() < 0.5
    record = {"word": word, "idx": idx, "label": label}
    for k, count in ((1, n // 2), (2, n - n // 2)):
        words = vocab.take(rng, count - 1 - (k == 1))
        if k == 1:
            words.insert(rng.randint(0, len(words)), "alike" if label else "apart")
        at = rng.randint(0, len(words))
        start = len(" ".join(words[:at])) + (1 if at else 0)
        words.insert(at, word)
        record.update({f"sentence{k}": " ".join(words), f"start{k}": start, f"end{k}": start + len(word)})
    return record


def wsc_record(vocab, rng, idx):
    n = lognormal_words(rng, "WSC", low=6)
    label = rng.random() < 0.5
    noun = vocab.name(rng)
    words = vocab.take(rng, n - 2 - len(noun.split()))
    words.insert(rng.randint(0, len(words)), "because" if label else "although")
    first = rng.randint(0, len(words) // 2)
    words[first:first] = noun.split()
    pronoun_at = rng.randint(first + len(noun.split()), len(words))
    words.insert(pronoun_at, rng.choice(("he", "she", "it")))
    return {"text": " ".join(words), "idx": idx, "label": label,
            "target": {"span1_index": first, "span1_text": noun, "span2_index": pronoun_at,
                       "span2_text": words[pronoun_at]}}


RECORDS = {"BoolQ": boolq_record, "WiC": wic_record, "WSC": wsc_record,
           "CB": lambda v, r, i: pair_record(v, r, i, "CB", CB_KEYWORDS),
           "RTE": lambda v, r, i: pair_record(v, r, i, "RTE", RTE_KEYWORDS)}


class PassageBuilder:
    """Text built piece by piece, remembering the character span of every entity mention."""

    def __init__(self):
        self.text, self.mentions = "", []

    def add(self, piece, entity=False, joint=" "):
        if self.text:
            self.text += joint
        if entity:
            self.mentions.append((piece, len(self.text), len(self.text) + len(piece) - 1))  # inclusive end
        self.text += piece


def candidate_count(rng):
    """Candidate entities of a passage: lognormal with median 12 and sigma 0.35 (mean about 12.7), 2 to 23."""
    return min(23, max(2, round(rng.lognormvariate(math.log(12), 0.35))))


def record_record(vocab, rng, idx, queries=1):
    """One official ReCoRD line: a passage with its entities and `queries` queries. The answer is the entity
    that follows the word "champion" in the passage; the query says "champion" too. Words: passage and query
    together, as measured."""
    count = candidate_count(rng)
    entities = list(dict.fromkeys(vocab.name(rng) for _ in range(3 * count)))[:count]
    answer = rng.choice(entities)
    query_words = [rng.randint(10, 25) for _ in range(queries)]
    highlights = [(rng.choice(entities), vocab.sentence(rng, rng.randint(6, 12))) for _ in range(3)]
    mentions = entities + rng.sample(entities, k=len(entities) // 3)  # every entity, a third of them twice
    fixed = sum(1 + len(e.split()) + len(h.split()) for e, h in highlights) + sum(len(e.split()) for e in mentions) + 1
    body = [(w, False) for w in vocab.take(rng, lognormal_words(rng, "ReCoRD", low=80) - query_words[0] - fixed)]
    for entity in mentions:
        body.insert(rng.randint(0, len(body)), (entity, True))
    at = next(i for i, (piece, is_entity) in enumerate(body) if piece == answer and is_entity)
    body.insert(at, ("champion", False))
    passage = PassageBuilder()
    for piece, is_entity in body:
        passage.add(piece, is_entity)
    passage.text += "."
    for entity, line in highlights:  # "@highlight" lines, each naming an entity
        passage.add("@highlight", joint="\n")
        passage.add(entity, entity=True, joint="\n")
        passage.add(line)
    answer_spans = [m for m in passage.mentions if m[0] == answer]
    qas = []
    for q, words in enumerate(query_words):
        query = with_keyword(vocab.take(rng, words - 2) + ["@placeholder"], "champion", rng)
        qas.append({"query": query, "idx": idx * 10 + q,
                    "answers": [{"start": s, "end": e, "text": t} for t, s, e in answer_spans[:1]]})
    return {"source": "synthetic", "idx": idx, "qas": qas,
            "passage": {"text": passage.text, "entities": [{"start": s, "end": e} for _, s, e in passage.mentions]}}


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_tasks(data_dir, tasks, train, val, seed):
    """DIR/<Task>/{train,val}.jsonl; returns the text lines the tokenizer is trained on."""
    vocab, lines = Vocabulary(seed), []
    for task in tasks:
        for s, (split, count) in enumerate((("train", train), ("val", val))):
            rng = random.Random(f"{seed} {task} {s}")  # a task's data do not depend on the other tasks chosen
            if task == "ReCoRD":
                records = [record_record(vocab, rng, i) for i in range(count)]
                lines += [r["passage"]["text"].replace("\n", " ") for r in records]
                lines += [qa["query"] for r in records for qa in r["qas"]]
            else:
                records = [RECORDS[task](vocab, rng, i) for i in range(count)]
                lines += [" ".join(v for k, v in r.items() if isinstance(v, str)) for r in records]
            write_jsonl(os.path.join(data_dir, task, f"{split}.jsonl"), records)
    rng = random.Random(seed)  # plus plain text, so that a small task still gives the vocabulary its pieces
    lines += [vocab.sentence(rng, 50) for _ in range(4000)]
    return lines


# ---------------------------------------------------------------- subprocesses
def child_env(args, tree=ROOT, extra=None):
    env = dict(os.environ, PYTHONPATH=tree, PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(args.threads or len(os.sched_getaffinity(0))))
    env.pop("DEBERTA_DS_FAULT", None)
    env.update(extra or {})
    return env


class GpuPeak(threading.Thread):
    """Peak GPU memory of one process from nvidia-smi every 0.5 s (CUDA runs only; None without nvidia-smi)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak_mib, self.done = pid, None, threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10, check=False).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == str(self.pid) and used.strip().isdigit():
                    self.peak_mib = max(self.peak_mib or 0, int(used))


def run_logged(cmd, log_path, env, cwd=ROOT):
    """Run cmd with its output in log_path: (exit code, wall seconds, peak RSS bytes, peak GPU MiB or None)."""
    with open(log_path, "w", encoding="utf-8") as log:
        start = time.perf_counter()
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        gpu = GpuPeak(process.pid) if shutil.which("nvidia-smi") else None
        if gpu:
            gpu.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if gpu:
            gpu.done.set()
    return process.returncode, wall, usage.ru_maxrss * 1024, gpu.peak_mib if gpu else None


def last_line(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(no output)"


def internal(args, action, spec, log_path, tree=ROOT):
    """This file's own `--internal ACTION SPEC` in a subprocess (torch is imported there, never here)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--internal", action, spec]
    code, wall, rss, gpu = run_logged(cmd, log_path, child_env(args, tree))
    return code, wall, rss, gpu


def must(result, what, log_path):
    if result[0] != 0:
        sys.exit(f"error: {what} failed (exit {result[0]}): {last_line(log_path)} (log: {log_path})")
    return result


# ---------------------------------------------------------------- setup: data, tokenizer, releases, features
def setup(args, work, tasks):
    data_dir = os.path.join(work, "data")
    lines = write_tasks(data_dir, tasks, args.train_examples, args.val_examples, args.seed)
    corpus = os.path.join(work, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    log = os.path.join(work, "tokenizer.log")
    prefix = os.path.join(work, "tok", "spm")
    cmd = [sys.executable, "-m", "pipeline.cli", "tokenizer", "train", "--input", corpus, "--output", prefix,
           "--vocab-size", str(args.vocab_size), "--seed", str(args.seed)]
    must(run_logged(cmd, log, child_env(args)), "tokenizer train", log)
    spec = write_spec(work, "release", model=args.model, spm=prefix + ".model", seed=args.seed, out=work,
                      label_counts=sorted({LABEL_COUNTS[t] for t in tasks if t in LABEL_COUNTS}))
    log = os.path.join(work, "release.log")
    must(internal(args, "release", spec, log), "building the initial releases", log)
    return data_dir, prefix + ".model"


def write_spec(work, name, **values):
    path = os.path.join(work, f"{name}.spec.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=1)
    return path


def make_releases(spec):
    """An untrained MLM model saved as the 'pretrained' release, and per label count a classification release
    with the same encoder and a seeded pooler and classifier (both sides then load every weight)."""
    import torch

    from model import DebertaForMaskedLM, DebertaForSequenceClassification, preset
    from pipeline.data.tokenizer import Tokenizer
    from pipeline.release import save_release
    size = dict(MODELS[spec["model"]])
    size.setdefault("vocab_size", Tokenizer(spec["spm"]).padded_vocab_size)
    config = preset(size.pop("name"), **size)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the 1.5B model initialises in seconds there
    torch.manual_seed(spec["seed"])
    with torch.device(device):
        mlm = DebertaForMaskedLM(config).cpu()  # the release writer reads CPU tensors
    save_release(mlm, os.path.join(spec["out"], "release_mlm"), spm_path=spec["spm"])
    for count in spec["label_counts"]:
        torch.manual_seed(spec["seed"] + count)
        with torch.device(device):
            model = DebertaForSequenceClassification(config, num_labels=count).cpu()
        wanted = model.deberta.state_dict()  # all but the EMD's absolute position table, which only the MLM has
        model.deberta.load_state_dict({k: v for k, v in mlm.deberta.state_dict().items() if k in wanted})
        save_release(model, os.path.join(spec["out"], f"release_{count}labels"), spm_path=spec["spm"])
        del model
    print(json.dumps({"parameters": sum(p.numel() for p in mlm.deberta.parameters()), "vocab_size": config.vocab_size,
                      "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                 "num_attention_heads", "intermediate_size")}}))


def encode_features(spec):
    """The training set of each task as our command encodes it, for the Trainer: [{"input_ids", "label"}]."""
    from pipeline.data.tokenizer import Tokenizer
    from pipeline.finetune.tasks import get_task
    tokenizer = Tokenizer(spec["spm"])
    for name in spec["tasks"]:
        task = get_task(name)
        examples = task.load("train", spec["data_dir"])
        features = task.build_features(examples, tokenizer, spec["max_seq_len"])
        rows = [{"input_ids": list(f["input_ids"]), "label": int(f["label"])} for f in features]
        stats = {"examples": len(examples), "features": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows)}
        with open(os.path.join(spec["out"], f"{name}.features.json"), "w", encoding="utf-8") as f:
            json.dump({"stats": stats, "features": rows}, f)


# ---------------------------------------------------------------- the Trainer side (in its subprocess)
def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def trainer_run(spec):
    """transformers.Trainer on the features our command would train on; writes spec["result"]."""
    import torch
    import transformers
    from deepspeed import DeepSpeedEngine

    from pipeline.finetune.config import resolve

    settings = resolve(spec["task"], named={"lr": spec["lr"], "batch_size": spec["batch_size"], "epochs": spec["epochs"],
                                            "warmup_steps": spec["warmup_steps"], "cls_drop_out": spec["cls_drop_out"],
                                            "max_seq_len": spec["max_seq_len"], "seed": spec["seed"]})
    with open(spec["features"], encoding="utf-8") as f:
        features = json.load(f)["features"]
    with open(spec["ds_path"], encoding="utf-8") as f:
        ds_config = json.load(f)
    cuda = torch.cuda.is_available()
    config = transformers.DebertaV2Config.from_pretrained(spec["release"], cls_dropout=settings.cls_drop_out)
    model = transformers.DebertaV2ForSequenceClassification.from_pretrained(spec["release"], config=config)
    collator = CountingCollator()
    timer = epoch_timer()
    training_args = transformers.TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=1,
        num_train_epochs=settings.epochs, learning_rate=settings.lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_betas[0], adam_beta2=settings.adam_betas[1], adam_epsilon=settings.adam_eps,
        max_grad_norm=settings.clip_grad_norm, lr_scheduler_type="linear", warmup_steps=settings.warmup_steps,
        seed=settings.seed, **length_grouping(transformers, spec["group_by_length"]), deepspeed=ds_config,
        bf16=bool(ds_config.get("bf16", {}).get("enabled")), fp16=bool(ds_config.get("fp16", {}).get("enabled")),
        logging_steps=1, eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_pin_memory=cuda, dataloader_num_workers=0, remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=FeatureDataset(features),
                                   data_collator=collator, callbacks=[timer])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    engine = trainer.model_wrapped
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if not (trainer.is_deepspeed_enabled and isinstance(engine, DeepSpeedEngine) and engine.zero_optimization_stage() == stage):
        raise SystemExit(f"the Trainer did not train under DeepSpeed ZeRO-{stage}: {type(engine).__name__}")
    result = {"epochs": timer.epochs, "padding_fraction": collator.padding_fraction(),
              "deepspeed": {"engine": type(engine).__name__, "zero_stage": engine.zero_optimization_stage(),
                            "optimizer": type(engine.optimizer).__name__,
                            "backend": torch.distributed.get_backend(), "train_batch_size": engine.train_batch_size(),
                            "gradient_clipping": engine.gradient_clipping()},
              "vm_hwm_bytes": peak_rss(), "gpu_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    with open(spec["result"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def length_grouping(transformers, grouped):
    """The Trainer's LengthGroupedSampler on or off: train_sampling_strategy in transformers 5, group_by_length
    before."""
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


class FeatureDataset:
    """Our features as a map-style dataset (LengthGroupedSampler reads each item's input_ids)."""

    def __init__(self, features):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return {"input_ids": self.features[i]["input_ids"], "labels": self.features[i]["label"]}


class CountingCollator:
    """Pads a batch to its longest sequence with [PAD]=0 (as our collate), counting real and padded positions."""

    def __init__(self):
        self.real = self.total = 0

    def __call__(self, items):
        import torch
        longest = max(len(item["input_ids"]) for item in items)
        ids = torch.zeros((len(items), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, item in enumerate(items):
            ids[row, :len(item["input_ids"])] = torch.tensor(item["input_ids"])
            mask[row, :len(item["input_ids"])] = 1
        self.real += int(mask.sum())
        self.total += mask.numel()
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["labels"] for item in items])}

    def padding_fraction(self):
        return 1 - self.real / self.total if self.total else None


def epoch_timer():
    """A TrainerCallback (made here: transformers is imported in the Trainer's process only)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Training seconds and mean logged loss per epoch (on_epoch_end comes before any evaluation)."""

        def __init__(self):
            self.epochs, self.started, self.losses = [], None, []

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.started, self.losses = time.perf_counter(), []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_epoch_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.started
            self.epochs.append({"epoch": len(self.epochs) + 1, "train_s": elapsed,
                                "train_loss": statistics.fmean(self.losses) if self.losses else None})

    return Timer()


# ---------------------------------------------------------------- one run of a variant
def ours_command(args, task, release, data_dir, out, sift, extra_sets=(), epochs=None, tree=ROOT):
    cmd = [sys.executable, "-m", "pipeline.cli", "finetune", "--task", task, "--release", release,
           "--data-dir", data_dir, "--output-dir", out, "--deepspeed", args.ds_path, "--lr", str(args.lr),
           "--batch-size", str(args.batch_size), "--epochs", str(epochs or args.epochs),
           "--warmup-steps", str(args.warmup_steps), "--max-seq-len", str(args.max_seq_len),
           "--cls-drop-out", str(args.cls_drop_out), "--seed", str(args.seed), "--sift", "on" if sift else "off"]
    for item in extra_sets:
        cmd += ["--set", item]
    return cmd


def ours_epochs(out):
    """Per-epoch records of OUT/metrics.json: training seconds ("train_s", or elapsed_s differences: then
    'approx' is True), the task loss (SiFT's adversarial term left out), padding fraction where recorded."""
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        records = json.load(f)["epochs"]
    epochs, before = [], 0.0
    for r in records:
        seconds, approx = (r["train_s"], False) if "train_s" in r else (r["elapsed_s"] - before, True)
        before = r.get("elapsed_s", before)
        loss = r.get("task_loss", r.get("train_loss"))  # with SiFT, train_loss adds the adversarial term
        epochs.append({"epoch": r["epoch"], "train_s": seconds, "approx": approx, "train_loss": loss,
                       "padding_fraction": r.get("padding_fraction")})
    return epochs


def run_variant(args, work, variant, task, data_dir, run_no):
    """One fine-tuning run in a subprocess: its epochs, peak memory and wall time, or the failure."""
    out = os.path.join(work, "runs", f"{task}-{variant}-{run_no}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    log = os.path.join(out, "log.txt")
    release = os.path.join(work, f"release_{LABEL_COUNTS[task]}labels")
    if variant.startswith("ours"):
        sets = ["group_by_length=false"] if variant == "ours_ungrouped" else []
        cmd = ours_command(args, task, release, data_dir, out, sift=variant == "ours_sift", extra_sets=sets)
        code, wall, rss, gpu = run_logged(cmd, log, child_env(args))
        if code != 0:
            return {"failed": f"exit {code}: {last_line(log)}", "log": log}
        epochs = ours_epochs(out)
        shutil.rmtree(os.path.join(out, "best"), ignore_errors=True)  # the best release is no result (1.5B: 6 GB)
        padding = [e["padding_fraction"] for e in epochs]
        padding = statistics.fmean(padding) if None not in padding else None
        return {"epochs": epochs, "padding_fraction": padding, "peak_rss_bytes": rss, "peak_gpu_mib": gpu,
                "wall_s": wall, "log": log}
    spec = write_spec(out, "trainer", task=task, release=release, features=os.path.join(work, f"{task}.features.json"),
                      ds_path=args.ds_path, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                      warmup_steps=args.warmup_steps, cls_drop_out=args.cls_drop_out, max_seq_len=args.max_seq_len,
                      seed=args.seed, group_by_length=variant == "trainer_grouped", out=out,
                      result=os.path.join(out, "result.json"))
    # what `torchrun --nproc_per_node 1` sets: accelerate then joins the process group itself (module docstring)
    env = child_env(args, extra={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(runs.free_port())})
    cmd = [sys.executable, os.path.abspath(__file__), "--internal", "trainer", spec]
    code, wall, rss, gpu = run_logged(cmd, log, env)
    if code != 0:
        return {"failed": f"exit {code}: {last_line(log)}", "log": log}
    with open(os.path.join(out, "result.json"), encoding="utf-8") as f:
        result = json.load(f)
    for e in result["epochs"]:
        e["approx"] = False
    return dict(result, peak_rss_bytes=rss, peak_gpu_mib=gpu, wall_s=wall, log=log)


# ---------------------------------------------------------------- compare
def summarize(runs_of_variant, stats, epochs):
    """The median over rounds of one variant on one task."""
    good = [r for r in runs_of_variant if "failed" not in r]
    if not good:
        return {"failed": runs_of_variant[-1]["failed"], "log": runs_of_variant[-1]["log"]}
    train_s = statistics.median(sum(e["train_s"] for e in r["epochs"]) for r in good)
    median = lambda key: statistics.median(r[key] for r in good) if all(r.get(key) is not None for r in good) else None  # noqa: E731
    first = [r["epochs"][0]["train_loss"] for r in good]
    last = [r["epochs"][-1]["train_loss"] for r in good]
    return {"train_s": train_s, "approx_time": any(e["approx"] for r in good for e in r["epochs"]),
            "examples_per_s": stats["examples"] * epochs / train_s, "tokens_per_s": stats["tokens"] * epochs / train_s,
            "padding_fraction": median("padding_fraction"), "peak_rss_bytes": median("peak_rss_bytes"),
            "peak_gpu_mib": median("peak_gpu_mib"), "first_epoch_loss": statistics.median(first),
            "last_epoch_loss": statistics.median(last), "rounds_train_s": [sum(e["train_s"] for e in r["epochs"]) for r in good],
            "deepspeed": good[0].get("deepspeed"), "failed_rounds": len(runs_of_variant) - len(good),
            "logs": [r["log"] for r in runs_of_variant]}


def compare(args, work, emit):
    data_dir, spm = setup(args, work, args.tasks)
    spec = write_spec(work, "encode", spm=spm, data_dir=data_dir, tasks=args.tasks, max_seq_len=args.max_seq_len, out=work)
    log = os.path.join(work, "encode.log")
    must(internal(args, "encode", spec, log), "encoding the tasks", log)
    stats = {}
    for task in args.tasks:
        with open(os.path.join(work, f"{task}.features.json"), encoding="utf-8") as f:
            stats[task] = json.load(f)["stats"]
    emit(header(args, work, stats))
    raw = {t: {v: [] for v in args.variants} for t in args.tasks}
    for run_no in range(args.rounds):
        for task in args.tasks:
            for variant in args.variants:
                result = run_variant(args, work, variant, task, data_dir, run_no)
                raw[task][variant].append(result)
                emit(f"  round {run_no + 1} {task} {variant}: " + (f"FAILED {result['failed']}" if "failed" in result else
                     f"{sum(e['train_s'] for e in result['epochs']):.1f} s training, {result['wall_s']:.0f} s wall"))
    results = {t: {v: summarize(raw[t][v], stats[t], args.epochs) for v in args.variants} for t in args.tasks}
    emit(compare_table(args, results))
    return {"stats": stats, "results": results}


def header(args, work, stats):
    with open(os.path.join(work, "release.log"), encoding="utf-8") as f:
        model = json.loads([line for line in f if line.startswith("{")][-1])
    lines = [(f"model {args.model}: {model['config']}, vocab {model['vocab_size']}, {model['parameters'] / 1e6:.1f}M "
              f"encoder parameters; DeepSpeed config {os.path.relpath(args.ds_path, ROOT)}; {platform.node()}, "
              f"OMP_NUM_THREADS {child_env(args)['OMP_NUM_THREADS']}, load average {os.getloadavg()[0]:.2f}"),
             (f"batch {args.batch_size}, lr {args.lr}, warmup {args.warmup_steps} steps, max_seq_len {args.max_seq_len}, "
              f"{args.epochs} epoch(s), seed {args.seed}, {args.rounds} round(s) (median)")]
    for task, s in stats.items():
        lines.append(f"  {task}: {s['examples']} train examples, {s['tokens']} non-pad tokens "
                     f"({s['tokens'] / s['examples']:.0f} per example)")
    return "\n".join(lines)


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def compare_table(args, results):
    """Markdown: one row per task and variant; 'x T' and 'x Tg' are ratios to the Trainer without and with
    group_by_length; '~' marks training times that include the epoch's evaluation and save."""
    head = ["task", "variant", "train s", "examples/s", "tokens/s", "x T", "x Tg", "padding", "peak RSS GB", "x T",
            "loss ep1", "loss last", "s per round"]
    lines = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, by_variant in results.items():
        base, grouped = by_variant.get("trainer", {}), by_variant.get("trainer_grouped", {})
        for variant, r in by_variant.items():
            if "failed" in r:
                lines.append(f"| {task} | {variant} | failed: {r['failed'][:120]} (log {r['log']}) |")
                continue
            padding = f"{r['padding_fraction']:.1%}" if r["padding_fraction"] is not None else "-"
            lines.append("| " + " | ".join([
                task, variant, f"{r['train_s']:.1f}{'~' if r['approx_time'] else ''}", f"{r['examples_per_s']:.1f}",
                f"{r['tokens_per_s']:.0f}", ratio(r["tokens_per_s"], base.get("tokens_per_s")),
                ratio(r["tokens_per_s"], grouped.get("tokens_per_s")), padding, f"{r['peak_rss_bytes'] / 1e9:.2f}",
                ratio(r["peak_rss_bytes"], base.get("peak_rss_bytes")), fmt_loss(r["first_epoch_loss"]),
                fmt_loss(r["last_epoch_loss"]), " ".join(f"{t:.1f}" for t in r["rounds_train_s"])]) + " |")
    lines += ["", "x T / x Tg: tokens/s (or memory) over the Trainer's with group_by_length False / True."]
    lines += sift_lines(results) + gpu_lines(results)
    if any(r.get("approx_time") for v in results.values() for r in v.values()):
        lines.append("~: no per-epoch train_s in this tree's metrics.json: elapsed_s differences (training + the "
                     "epoch's val evaluation + the best-model save)")
    return "\n".join(lines)


def fmt_loss(value):
    return f"{value:.4f}" if value is not None else "-"


def sift_lines(results):
    lines = []
    for task, r in results.items():
        off, on = r.get("ours", {}), r.get("ours_sift", {})
        if "train_s" in off and "train_s" in on:
            lines.append(f"SiFT on {task}: {on['train_s'] / off['train_s']:.2f}x the training time of SiFT off "
                         f"(same steps)")
    return lines


def gpu_lines(results):
    lines = []
    for task, r in results.items():
        peaks = {v: x["peak_gpu_mib"] for v, x in r.items() if x.get("peak_gpu_mib")}
        if peaks:
            lines.append(f"peak GPU memory on {task} (nvidia-smi, MiB): " + ", ".join(f"{v} {m}" for v, m in peaks.items()))
    return lines


# ---------------------------------------------------------------- record
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


# ---------------------------------------------------------------- main
INTERNAL = {"release": make_releases, "encode": encode_features, "trainer": trainer_run}


def failures(summary):
    text = json.dumps(summary)
    return text.count('"failed": "')


def main(argv=None, emit=print):
    args = parse_args(argv)
    if args.internal:
        action, spec = args.internal
        with open(spec, encoding="utf-8") as f:
            return INTERNAL[action](json.load(f))
    work = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix="bench-finetune-")
    if args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    emit(f"bench/finetune.py {args.mode}: work directory {work}")
    summary = (record if args.mode == "record" else compare)(args, work, lambda text: emit(text) or sys.stdout.flush())
    summary["args"] = {k: v for k, v in vars(args).items() if k != "internal"}
    emit(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    failed = failures(summary)
    if failed:
        emit(f"{failed} run(s) failed; their logs are in {work}")
    elif not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
