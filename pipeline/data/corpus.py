"""The embedded demo corpus: docstrings of the Python standard library.

Every machine that runs this project has the standard library's source, so the demo needs no
network. Modules are parsed with `ast` (never imported: importing runs code and can have side
effects). Output is deterministic: files are walked in sorted order and the text is split into a
fixed number of .txt files, one document per line (newlines inside a docstring become spaces).
"""
import ast
import os
import sysconfig
import warnings
from pathlib import Path

from pipeline.errors import DataError
from pipeline.io import atomic_write, make_dirs
from pipeline.cli_types import positive_int

DEFAULT_MAX_BYTES = 3_000_000  # "a few MB": enough to train a small tokenizer and a tiny model
DEFAULT_NUM_FILES = 4
MIN_DOC_CHARS = 40  # shorter docstrings ("Return x.") carry little text


def add_arguments(parser):
    parser.add_argument("--output", required=True, help="directory to write corpus-XXXX.txt files into")
    parser.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES,
                        help="stop after this many bytes of text (default %(default)s)")
    parser.add_argument("--num-files", type=positive_int, default=DEFAULT_NUM_FILES,
                        help="number of .txt files to split the corpus into (default %(default)s)")
    parser.add_argument("--stdlib", default=None,
                        help="standard-library directory to read (default: this Python's)")


def run(args):
    paths = write_corpus(args.output, max_bytes=args.max_bytes, num_files=args.num_files, stdlib_dir=args.stdlib)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files, {total} bytes to {args.output}")


def stdlib_source_files(stdlib_dir=None):
    """All .py files of the standard library in sorted order, without site-packages and tests."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skipped)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def docstrings_of(path):
    """The docstrings of a module, its classes and functions, in source order, as one-line texts."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return  # a few stdlib files are templates or deliberately broken
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= MIN_DOC_CHARS:
            yield " ".join(doc.split())


def iter_documents(stdlib_dir=None):
    for path in stdlib_source_files(stdlib_dir):
        yield from docstrings_of(path)


def write_corpus(output_dir, max_bytes=DEFAULT_MAX_BYTES, num_files=DEFAULT_NUM_FILES, stdlib_dir=None):
    """Write the corpus as `num_files` files of about equal size; return their paths.

    Written under temporary names and renamed at the end, so an interrupted run leaves no half corpus.
    """
    output = Path(output_dir)
    make_dirs(str(output), "corpus directory")
    lines, size = [], 0
    for doc in iter_documents(stdlib_dir):
        line = doc + "\n"
        if size + len(line.encode("utf-8")) > max_bytes:
            break
        lines.append(line)
        size += len(line.encode("utf-8"))
    if not lines:
        raise DataError(f"no docstrings found under {stdlib_dir or sysconfig.get_paths()['stdlib']}")
    per_file = -(-len(lines) // num_files)
    paths = []
    for index in range(num_files):
        chunk = lines[index * per_file:(index + 1) * per_file]
        if not chunk:
            break
        final = output / f"corpus-{index:04d}.txt"
        atomic_write(str(final), "".join(chunk))
        paths.append(final)
    return paths
