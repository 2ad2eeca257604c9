"""Reading raw text as a stream of documents: local .txt / .jsonl / .parquet files (globs, gzip) or a
`datasets` dataset streamed by name. Nothing here holds more than one line or one parquet batch.

Bad input is an error that names the file and line (empty file, invalid UTF-8, a line longer than
`max_line_bytes`, a jsonl line that is not an object with the text field), never a silent skip. Every file
is opened by `open_input`, which also turns what the readers raise for a damaged file (a truncated gzip, a
`.gz` that is not gzip, a corrupt parquet, an OS error) into one InputError naming the file.
"""
import contextlib
import glob
import gzip
import json
import os
import zlib

from pipeline.errors import DataError
from pipeline.cli_types import positive_int

DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class InputError(DataError):
    """Bad input data; the message names the file and where in it."""


def add_source_arguments(parser):
    parser.add_argument("--input", nargs="+", default=[], metavar="GLOB",
                        help="local files or globs: .txt (one document per line), .jsonl, .parquet; "
                             ".gz compression is read transparently")
    parser.add_argument("--dataset", default=None,
                        help="a `datasets` dataset name (or local path) read with streaming=True instead of --input")
    parser.add_argument("--dataset-config", default=None, help="configuration name of --dataset")
    parser.add_argument("--dataset-split", default="train", help="split of --dataset (default %(default)s)")
    parser.add_argument("--text-field", default="text",
                        help="field/column holding the text in jsonl, parquet and datasets (default %(default)s)")
    parser.add_argument("--max-line-bytes", type=positive_int, default=DEFAULT_MAX_LINE_BYTES,
                        help="reject lines (documents) longer than this many bytes (default %(default)s)")


def expand_inputs(patterns):
    """Sorted, de-duplicated list of files matching the globs; an error for a glob that matches nothing."""
    files = []
    for pattern in patterns:
        pattern = str(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise InputError(f"{pattern}: no such file (or the glob matches no file)")
        files.extend(matches)
    return sorted(set(files))


def _base_suffix(path):
    name = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(name)[1].lower()


def _is_parquet(path):
    return _base_suffix(path) in PARQUET_SUFFIXES


@contextlib.contextmanager
def open_input(path):
    """The one way an input file is opened: a pyarrow ParquetFile for .parquet, else a binary stream (gzip
    decompressed when the name ends in .gz). Whatever opening it or reading inside the block raises for a
    damaged or unreadable file becomes one InputError naming the file and the problem."""
    with _input_errors(path):
        if _is_parquet(path):
            import pyarrow.parquet as pq  # pyarrow comes with `datasets`
            yield pq.ParquetFile(path)
        else:
            with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as handle:
                yield handle


@contextlib.contextmanager
def _input_errors(path):
    try:
        yield
    except DataError:
        raise
    except EOFError as error:  # gzip: the stream stops before its end marker
        raise InputError(f"{path}: truncated gzip file ({error})") from None
    except (gzip.BadGzipFile, zlib.error) as error:  # not gzip at all, or damaged compressed data / CRC
        raise InputError(f"{path}: not a valid gzip file ({error})") from None
    except Exception as error:
        if type(error).__module__.startswith("pyarrow"):  # ArrowInvalid, ArrowIOError, ...: a damaged parquet
            raise InputError(f"{path}: not a readable parquet file ({_one_line(error)})") from None
        if isinstance(error, OSError):
            raise InputError(f"{path}: cannot read ({error.strerror or _one_line(error)})") from None
        raise


def _one_line(error):
    return " ".join(str(error).split())


def _read_lines(path, max_line_bytes):
    """(line number, decoded line) for each non-blank line; errors name the file, line and byte offset."""
    seen_any = False
    offset = 0
    with open_input(path) as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(max_line_bytes + 1), b""), start=1):
            if len(raw.rstrip(b"\r\n")) > max_line_bytes:  # readline stopped at the limit
                raise InputError(f"{path}:{number} (byte offset {offset}): line longer than "
                                 f"--max-line-bytes={max_line_bytes}")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}:{number} (byte offset {offset + err.start}): invalid UTF-8") from None
            offset += len(raw)
            seen_any = True
            if line.strip():
                yield number, line.rstrip("\r\n")
    if not seen_any:
        raise InputError(f"{path}: empty file")


def _jsonl_texts(path, text_field, max_line_bytes):
    for number, line in _read_lines(path, max_line_bytes):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise InputError(f"{path}:{number}: expected an object with a string field {text_field!r}")
        yield record[text_field]


def _parquet_texts(path, text_field):
    with open_input(path) as parquet:
        if parquet.metadata.num_rows == 0:
            raise InputError(f"{path}: empty file")
        if text_field not in parquet.schema_arrow.names:
            raise InputError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
        column_type = parquet.schema_arrow.field(text_field).type
        if str(column_type) not in ("string", "large_string"):
            raise InputError(f"{path}: column {text_field!r} holds {column_type}, not text")
        for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text


def iter_file_texts(path, text_field="text", max_line_bytes=DEFAULT_MAX_LINE_BYTES):
    """The documents of one local file, in order."""
    suffix = _base_suffix(path)
    if _is_parquet(path):
        yield from _parquet_texts(path, text_field)
    elif suffix in JSONL_SUFFIXES:
        yield from _jsonl_texts(path, text_field, max_line_bytes)
    else:  # plain text, whatever its suffix: one document per line
        for _, line in _read_lines(path, max_line_bytes):
            yield line


def iter_dataset_texts(name, config=None, split="train", text_field="text"):
    """Documents of a `datasets` dataset, streamed (never downloaded whole, never held in memory)."""
    import datasets

    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    for number, record in enumerate(stream):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise InputError(f"dataset {name} record {number}: no string field {text_field!r}")
        if text:
            yield text


def describe_source(args):
    """The identity of the input (pipeline/data/preprocess.py records it, so that shards of different inputs
    are not mixed): a dataset by name, config and split; files by absolute path and total size."""
    if args.dataset:
        return {"dataset": args.dataset, "dataset_config": args.dataset_config, "dataset_split": args.dataset_split}
    files = expand_inputs(args.input)
    return {"input_files": [os.path.abspath(f) for f in files], "input_bytes": sum(os.path.getsize(f) for f in files)}
