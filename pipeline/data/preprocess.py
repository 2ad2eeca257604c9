"""`deberta-ds preprocess`: stream a corpus through N tokenizer processes into packed token shards.

Packing follows the official data preparation (spec §4.1): the token stream of all documents is cut into
lines of max_seq_len-2 tokens, each stored as [CLS] + line + [SEP]. A shard ends at the first document
boundary after --shard-tokens tokens; the remainder of its stream becomes one shorter last sample.

Work split: task i of K (--shard-index/--num-shards, defaulting to SLURM_ARRAY_TASK_ID/COUNT) takes every
K-th input file when there are at least K files, else every K-th document. Its shards are named
task-i-of-K-part-j; the loader reads every manifest in the directory, so the tasks' outputs combine by
listing. Restart: complete shards (manifest present, sizes right) are skipped with their documents;
the first incomplete one is redone from its first document. The directory's identity (input, tokenizer,
lengths, task split: `output_identity`) is recorded on first use (pipeline/io.py check_output_identity), so a
rerun with anything else is refused instead of mixing two shard sets or replacing spm.model. Memory: a bounded number of document
chunks is in flight; the corpus is never held.
"""
import collections
import itertools
import multiprocessing
import os
import sys

import numpy as np

from pipeline.data import shards, sources
from pipeline.data.tokenizer import Tokenizer, file_sha256
from pipeline.errors import ConfigError, OutputError
from pipeline.io import atomic_copy, atomic_write, check_output_identity, make_dirs
from pipeline.cli_types import at_least, positive_int

CHUNK_BYTES = 1 << 18  # documents are sent to workers in chunks of about this much text


def add_arguments(parser):
    sources.add_source_arguments(parser)
    parser.add_argument("--tokenizer", required=True, help="spm.model from `deberta-ds tokenizer train`")
    parser.add_argument("--output-dir", required=True, help="directory for the shards (shared by all tasks)")
    parser.add_argument("--max-seq-len", type=at_least(3), default=512,
                        help="sample length including [CLS] and [SEP] (default %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=1, help="tokenizer processes (default %(default)s)")
    parser.add_argument("--num-shards", type=positive_int, default=None,
                        help="split the work into this many tasks (default: $SLURM_ARRAY_TASK_COUNT or 1)")
    parser.add_argument("--shard-index", type=at_least(0), default=None,
                        help="which task this process is, 0-based (default: $SLURM_ARRAY_TASK_ID or 0)")
    parser.add_argument("--split-by", choices=("auto", "files", "documents"), default="auto",
                        help="give tasks whole files or every K-th document; auto = files when there are "
                             "at least --num-shards files (default %(default)s)")
    parser.add_argument("--shard-tokens", type=positive_int, default=1 << 27,
                        help="start a new output shard after this many tokens (default %(default)s = 512 MiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def task_from_env(num_shards=None, shard_index=None, environ=os.environ):
    """(index, count) of this task: explicit values, else the Slurm array's, else (0, 1). A Slurm variable that
    is not an integer is one line naming it."""
    from pipeline.launch.env import env_int
    count = num_shards if num_shards is not None else env_int(environ, "SLURM_ARRAY_TASK_COUNT", 1)
    if shard_index is not None:
        index, source = shard_index, "--shard-index"
    elif environ.get("SLURM_ARRAY_TASK_ID", "").strip():
        index = env_int(environ, "SLURM_ARRAY_TASK_ID") - env_int(environ, "SLURM_ARRAY_TASK_MIN", 0)
        source = "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN"
    else:
        index, source = 0, "--shard-index"
    if not 0 <= index < count:
        counted = "SLURM_ARRAY_TASK_COUNT" if num_shards is None and environ.get("SLURM_ARRAY_TASK_COUNT", "").strip() \
            else "--num-shards"
        raise ConfigError(f"{source} gives task {index}, which is not in [0, {count}) ({counted} {count})")
    return index, count


def task_documents(args, task_index, num_tasks):
    """This task's documents, in a fixed order that does not depend on the number of workers."""
    if args.dataset:
        stream = sources.iter_dataset_texts(args.dataset, args.dataset_config, args.dataset_split, args.text_field)
        return itertools.islice(stream, task_index, None, num_tasks)
    files = sources.expand_inputs(args.input)
    if not files:
        raise sources.InputError("give --input files or --dataset")
    if split_mode(args, files, num_tasks) == "files":
        mine = files[task_index::num_tasks]
        return (t for f in mine for t in sources.iter_file_texts(f, args.text_field, args.max_line_bytes))
    stream = (t for f in files for t in sources.iter_file_texts(f, args.text_field, args.max_line_bytes))
    return itertools.islice(stream, task_index, None, num_tasks)


def split_mode(args, files, num_tasks):
    """How the tasks share the input: "files" (every K-th file) or "documents" (every K-th document)."""
    if args.dataset:
        return "documents"
    by_files = args.split_by == "files" or (args.split_by == "auto" and len(files) >= num_tasks)
    return "files" if by_files else "documents"


def output_identity(args, tokenizer, num_tasks):
    """Everything that decides the shards' content. Every task of a run, and a rerun that continues it, has the
    same; another input, tokenizer or setting in the same directory would mix two shard sets. --workers and
    --max-line-bytes are not in it: they change how, not what, is written."""
    source = sources.describe_source(args)
    files = [] if args.dataset else source["input_files"]
    return {"tokenizer_sha256": tokenizer.fingerprint, "max_seq_len": args.max_seq_len, **source,
            "text_field": args.text_field, "num_tasks": num_tasks, "split_by": split_mode(args, files, num_tasks),
            "shard_tokens": args.shard_tokens}


# ------------------------------------------------------------------ workers

_worker_tokenizer = None


def _init_worker(spm_path):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(spm_path, split_special_tokens=True)


def _tokenize_chunk(texts):
    """(all ids of the chunk as one int32 array, per-document lengths) — compact to send back."""
    encoded = _worker_tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def chunk_texts(texts, chunk_bytes=CHUNK_BYTES):
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenized_documents(texts, spm_path, workers):
    """Token ids of each document, in input order, from `workers` processes with bounded work in flight."""
    # forkserver, not fork: a fork copies the locks that other threads of this process hold (torch's, gloo's,
    # a progress bar's) and a worker can wait on one forever; seen in the test suite after in-process DeepSpeed
    context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "forkserver")
    with context.Pool(workers, initializer=_init_worker, initargs=(spm_path,)) as pool:
        pending = collections.deque()
        for chunk in chunk_texts(texts):
            pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
            if len(pending) >= 2 * workers:  # backpressure: never read far ahead of the tokenizers
                yield from _split(pending.popleft().get())
        while pending:
            yield from _split(pending.popleft().get())


def _split(result):
    flat, lengths = result
    ends = np.cumsum(lengths)
    for end, length in zip(ends, lengths):
        yield flat[end - length:end]


# ------------------------------------------------------------------ packing

class Packer:
    """Cuts a token stream into lines of `line_len` and writes them into the current shard."""

    def __init__(self, line_len):
        self.line_len = line_len
        self.pending = np.zeros(0, dtype=np.int32)

    def add(self, writer, ids):
        stream = np.concatenate([self.pending, ids]) if len(self.pending) else ids
        full = len(stream) // self.line_len * self.line_len
        if full:
            writer.write_block(stream[:full].reshape(-1, self.line_len))
        self.pending = np.array(stream[full:], dtype=np.int32)

    def flush(self, writer):
        if len(self.pending):
            writer.write_lines([self.pending])
        self.pending = np.zeros(0, dtype=np.int32)


def shard_name(task_index, num_tasks, part):
    return f"task-{task_index:05d}-of-{num_tasks:05d}-part-{part:06d}"


def finished_parts(output_dir, task_index, num_tasks):
    """(number of leading complete shards, documents they hold): what a restart can skip."""
    part, documents = 0, 0
    while shards.is_complete(output_dir, shard_name(task_index, num_tasks, part)):
        manifest = shards.read_manifest(shards.shard_paths(output_dir, shard_name(task_index, num_tasks, part))["json"])
        documents += manifest["documents"]
        part += 1
    return part, documents


def keep_tokenizer_copy(spm_path, output_dir, replace):
    """The shard directory carries its tokenizer (spm.model), so pretraining needs only the directory.
    Array tasks race to write it: each writes a private temporary file and renames it. Another spm.model is
    replaced only where no shard has been written (`replace`): shards belong to theirs."""
    target = os.path.join(output_dir, "spm.model")
    if os.path.exists(target):
        if file_sha256(target) == file_sha256(spm_path):
            return
        if not replace:
            raise OutputError(f"{target}: another tokenizer than --tokenizer {spm_path} (sha256 "
                              f"{file_sha256(target)[:16]}... vs {file_sha256(spm_path)[:16]}...): the shards there "
                              "belong to it; preprocess into a new --output-dir")
    atomic_copy(spm_path, target)


def holds_shards(output_dir):
    """True once any task has begun a shard here (a complete one, or a partial .tmp of a killed run)."""
    return any(name.startswith("task-") for name in os.listdir(output_dir))


def check_same_output(args, tokenizer, num_tasks):
    """Refuse to write into a shard directory that holds (or began to hold) the shards of other inputs or
    settings; a rerun with the same ones continues where it stopped. A directory with no shard yet (a first
    run that failed on its input) takes the new identity: there is nothing to mix."""
    check_output_identity(args.output_dir, "preprocess", output_identity(args, tokenizer, num_tasks),
                          f"preprocess into a new --output-dir, or delete {args.output_dir} to redo it (shards of "
                          "two inputs or settings in one directory would be read as one data set)",
                          force=not holds_shards(args.output_dir))


def preprocess(args, task_index, num_tasks):
    """Write this task's shards; return (shards written now, tokens written now)."""
    tokenizer = Tokenizer(args.tokenizer)
    make_dirs(args.output_dir, "shard directory")
    check_same_output(args, tokenizer, num_tasks)
    keep_tokenizer_copy(args.tokenizer, args.output_dir, replace=not holds_shards(args.output_dir))
    done_marker = shards.task_done_path(args.output_dir, task_index, num_tasks)
    if os.path.exists(done_marker):
        return 0, 0
    part, skip_documents = finished_parts(args.output_dir, task_index, num_tasks)
    texts = itertools.islice(task_documents(args, task_index, num_tasks), skip_documents, None)
    metadata = {"tokenizer_sha256": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                "max_seq_len": args.max_seq_len}
    progress = _progress_bar(args)
    written = tokens = 0
    writer, packer, documents = None, Packer(args.max_seq_len - 2), 0
    try:
        for ids in tokenized_documents(texts, args.tokenizer, args.workers):
            if writer is None:
                name = shard_name(task_index, num_tasks, part)
                shards.remove_shard(shards.shard_paths(args.output_dir, name))  # a partial one from a crash
                writer, documents = shards.ShardWriter(args.output_dir, name, tokenizer.cls_id, tokenizer.sep_id), 0
            packer.add(writer, ids)
            documents += 1
            progress.update(len(ids))
            if writer.num_tokens >= args.shard_tokens:
                tokens += _close(writer, packer, metadata, documents, task_index, num_tasks, part)
                writer, part, written = None, part + 1, written + 1
        if writer is not None:
            tokens += _close(writer, packer, metadata, documents, task_index, num_tasks, part)
            writer, part, written = None, part + 1, written + 1
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        progress.close()
    if part == 0:
        raise sources.InputError(f"task {task_index} of {num_tasks}: no documents in the input")
    atomic_write(done_marker, f"{part}\n")  # the number of shards of this task
    return written, tokens


def _close(writer, packer, metadata, documents, task_index, num_tasks, part):
    packer.flush(writer)
    source = {"task_index": task_index, "num_tasks": num_tasks, "part": part}
    manifest = writer.close(dict(metadata, documents=documents, source=source))
    return manifest["num_tokens"]


def _progress_bar(args):
    from tqdm import tqdm

    return tqdm(unit="tok", unit_scale=True, file=sys.stderr, disable=args.no_progress,
                desc="preprocess", smoothing=0.1)


def run(args):
    task_index, num_tasks = task_from_env(args.num_shards, args.shard_index)
    written, tokens = preprocess(args, task_index, num_tasks)
    print(f"task {task_index} of {num_tasks}: wrote {written} shards, {tokens} tokens to {args.output_dir}")
    return 0
