"""Writing outputs so that readers never see half of one, and a command never silently changes another's.

Files: everything goes to a temporary name in the same directory and is renamed into place when complete
(os.replace is atomic on POSIX). A failed write leaves the previous file (or nothing) and no temporary
behind, and is an OutputError naming the path and the OS error. New files get the usual permissions (0666
minus the umask), not mkstemp's private 0600.

Directories (`staged_directory`): built under a temporary name that carries its owner (pid, process start,
host), renamed into place; the rename refuses a target that appeared meanwhile unless replacing was asked.
A temporary directory whose owner is dead (a killed command) is removed by the next one to that name.

Identity (`check_output_identity`): a command that writes into an existing directory records what it
writes there (DIR/deberta-ds.output.json); a later one that would write something else is refused.
"""
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
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
def staged_directory(out_dir, replace=False, force_hint="give --overwrite to replace it"):
    """A temporary directory beside out_dir that becomes out_dir when the block succeeds and is removed when
    it fails: the output is either complete or absent. With replace (the caller has decided that the existing
    out_dir may go) it is moved aside first and deleted only once the new one is in place; without, an out_dir
    that is not empty when the block ends (another command wrote it meanwhile) is refused, naming force_hint,
    and left alone."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    make_dirs(parent)
    remove_dead_temporaries(out_dir)
    tmp = _make_owned_directory(out_dir)
    try:
        yield tmp
        if replace:
            _swap_in(tmp, out_dir)
        else:
            _rename_no_replace(tmp, out_dir, force_hint)
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


def _rename_no_replace(new, out_dir, force_hint):
    """Rename `new` to out_dir, which must be absent or empty: rename(2) itself refuses a non-empty target
    (ENOTEMPTY/EEXIST), so two commands finishing at once cannot replace each other's output."""
    try:
        os.rename(new, out_dir)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise OutputError(f"{out_dir}: appeared while this output was written (another command wrote it); it is "
                          f"left as it is and this output is discarded: choose another name, or {force_hint}") from None


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


# ---------------------------------------------------------------- temporary directories and their owners
_OWNER = re.compile(r"(\d+)\.(\d+|x)@(.+)-[0-9a-f]{8}")


def _temporary_prefix(out_dir):
    return f".tmp-{os.path.basename(out_dir)}-"


def _make_owned_directory(out_dir):
    """A new directory `.tmp-NAME-PID.START@HOST-RANDOM` beside out_dir, readable as outputs are (0777 minus
    the umask): the name says whose it is, so a later command can tell a killed owner's from a live one's."""
    from pipeline.run.lifecycle import _process_start
    start = _process_start(os.getpid())
    owner = f"{os.getpid()}.{'x' if start is None else start}@{socket.gethostname()}"
    for _ in range(100):
        tmp = os.path.join(os.path.dirname(out_dir), f"{_temporary_prefix(out_dir)}{owner}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp, 0o777)  # the umask applies, as for any output directory
            return tmp
        except FileExistsError:
            continue
        except OSError as error:
            raise OutputError(f"{out_dir}: cannot create ({error.strerror or error})") from None
    raise OutputError(f"{out_dir}: cannot create a temporary directory beside it")


def remove_dead_temporaries(out_dir):
    """Remove the temporary directories of out_dir whose owner (a process on this host) has ended: a command
    killed while writing (SIGKILL, a node's OOM killer) leaves a full-size one that nothing else removes. One
    of a live process, or of another host (whose processes cannot be seen from here), is kept and named."""
    from pipeline.run.lifecycle import _alive, _process_start
    parent, prefix = os.path.dirname(os.path.abspath(out_dir)), _temporary_prefix(out_dir)
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        owner = _OWNER.fullmatch(name[len(prefix):])
        if owner is None:
            continue  # not one of ours (or from a build that did not name its owner)
        pid, start, host = int(owner[1]), owner[2], owner[3]
        path = os.path.join(parent, name)
        if host != socket.gethostname():
            print(f"{path}: a temporary output of a process on {host} (pid {pid}); delete it if that is gone",
                  file=sys.stderr)
            continue
        if _alive(pid) and start in ("x", str(_process_start(pid))):
            continue  # its owner is still writing
        shutil.rmtree(path, ignore_errors=True)
        print(f"{path}: removed, a temporary output left by a process that ended (pid {pid})", file=sys.stderr)


# ---------------------------------------------------------------- the identity of an output
OUTPUT_RECORD = "deberta-ds.output.json"


def check_output_identity(directory, what, identity, force_hint, force=False):
    """Refuse to write into `directory` something other than what it holds.

    what: the command writing it ("preprocess"); identity: a JSON-able dict of whatever decides the output's
    content (input, tokenizer sha256, lengths ...); force_hint: how a user replaces it deliberately, e.g.
    "give --overwrite to replace it". The first use records {what, identity} in DIR/deberta-ds.output.json
    (atomically: of several processes starting at once, one record wins and the others compare with it). A
    later use with an equal record passes (a rerun continues or skips); with another one it raises an
    OutputError naming the directory, each differing key with both values, and force_hint. force=True records
    the new identity instead (the caller replaces the output). Returns True when this call recorded it."""
    path = os.path.join(directory, OUTPUT_RECORD)
    record = json.loads(json.dumps({"written_by": what, "identity": identity}))  # as it reads back (tuples -> lists)
    if force:
        atomic_json(path, record)
        return True
    if _create_record(path, record):
        return True
    recorded = _read_record(path)
    differs = _differences(recorded, record)
    if differs:
        raise OutputError(f"{directory}: holds the output of a {recorded.get('written_by')} of other inputs or "
                          f"settings ({'; '.join(differs)}); {force_hint}")
    return False


def _create_record(path, record):
    """Write the record if there is none, never over one (link(2) refuses an existing name). True if written."""
    staged = os.path.join(os.path.dirname(path), f".{OUTPUT_RECORD}.{os.getpid()}.{secrets.token_hex(4)}")
    atomic_json(staged, record)
    try:
        os.link(staged, path)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise OutputError(f"{path}: cannot write ({error.strerror or error})") from None
        # a file system without hard links: check, then rename (a narrow race between processes starting at once)
        if os.path.exists(path):
            return False
        os.replace(staged, path)
        return True
    finally:
        _remove(staged)


def _read_record(path):
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError) as error:
        raise OutputError(f"{path}: cannot read the record of what this directory holds ({error}); it is "
                          "written only by deberta-ds: restore it, or use another directory") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("identity"), dict):
        raise OutputError(f"{path}: not a deberta-ds output record; use another directory")
    return recorded


def _differences(recorded, record):
    """'key: recorded A, now B' for each difference (the writing command first, then the identity's keys)."""
    differs = []
    if recorded.get("written_by") != record["written_by"]:
        differs.append(f"written by: {recorded.get('written_by')}, now {record['written_by']}")
    old, new = recorded["identity"], record["identity"]
    for key in list(new) + [k for k in old if k not in new]:
        if old.get(key, "(none)") != new.get(key, "(none)"):
            differs.append(f"{key}: {_show_pair(old.get(key, '(none)'), new.get(key, '(none)'))}")
    return differs


def _show_pair(old, new, width=80):
    """Both values, short enough for one line: lists by their length and first difference."""
    if isinstance(old, list) and isinstance(new, list):
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))

        def entry(values):
            return _short(json.dumps(values[first]), width) if first < len(values) else "(none)"
        return (f"recorded {len(old)} entries, now {len(new)}; first difference at entry {first}: "
                f"recorded {entry(old)}, now {entry(new)}")
    return f"recorded {_short(json.dumps(old), width)}, now {_short(json.dumps(new), width)}"


def _short(text, width):
    return text if len(text) <= width else text[:width - 3] + "..."
