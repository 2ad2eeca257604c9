"""Writing files so that readers never see half of one: everything goes to a temporary name in the same
directory and is renamed into place when complete (os.replace is atomic on POSIX). A failed write leaves
the previous file (or nothing) and no temporary behind, and is an OutputError naming the path and the OS
error. New files get the usual permissions (0666 minus the umask), not mkstemp's private 0600.
"""
import contextlib
import json
import os
import shutil
import tempfile

from pipeline.errors import OutputError


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dirs(path, what="directory"):
    """os.makedirs(path, exist_ok=True), an OutputError naming the path when it cannot be created."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{path}: cannot create the {what} ({error.strerror or error})") from None
    return path


@contextlib.contextmanager
def atomic_file(path, mode="w", encoding="utf-8"):
    """A handle to a temporary file beside `path` that becomes `path` when the block ends without error."""
    directory = os.path.dirname(os.path.abspath(path))
    make_dirs(directory)
    try:
        handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as error:
        raise OutputError(f"{path}: cannot write ({error.strerror or error})") from None
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as error:
        _remove(tmp)
        if is_output_error(error, tmp):
            raise OutputError(f"{path}: cannot write ({error.strerror or error})") from None
        raise


def atomic_write(path, data):
    """Write str or bytes to `path` atomically."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


def atomic_json(path, value, indent=2):
    return atomic_write(path, json.dumps(value, indent=indent) + "\n")


def atomic_copy(source, path):
    """Copy a file to `path` atomically (the tokenizer beside shards or in a release)."""
    with atomic_file(path, "wb") as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out)
    return path


def _remove(tmp):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


@contextlib.contextmanager
def staged_directory(out_dir):
    """A temporary directory beside out_dir that becomes out_dir when the block succeeds and is removed when
    it fails: the output is either complete or absent. An existing out_dir (the caller has decided it may be
    replaced) is moved aside first and deleted only once the new one is in place."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    make_dirs(parent)
    try:
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out_dir)}-", dir=parent)
    except OSError as error:
        raise OutputError(f"{out_dir}: cannot create ({error.strerror or error})") from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs are for others to read
    try:
        yield tmp
        _swap_in(tmp, out_dir)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_output_error(error, tmp, out_dir):
            raise OutputError(f"{out_dir}: cannot write ({error.strerror or error})") from None
        raise


def is_output_error(error, *outputs):
    """An OSError of writing the output (no file named, or one of `outputs` or inside them), as opposed to one
    of reading an input inside the block, which keeps its own file name."""
    if not isinstance(error, OSError) or isinstance(error, OutputError):
        return False
    named = [os.path.abspath(os.fsdecode(f)) for f in (error.filename, error.filename2) if f is not None]
    return not named or any(n == o or n.startswith(o + os.sep) for n in named for o in map(os.path.abspath, outputs))


def _swap_in(new, out_dir):
    """Rename `new` to out_dir; an existing out_dir is moved aside first (and back if the rename fails)."""
    if not os.path.exists(out_dir):
        os.replace(new, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(out_dir)}-", dir=os.path.dirname(out_dir))
    previous = os.path.join(old, "previous")
    os.replace(out_dir, previous)
    try:
        os.replace(new, out_dir)
    except BaseException:
        os.replace(previous, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
