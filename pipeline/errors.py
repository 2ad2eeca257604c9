"""One root for every failure a user can cause, so that the CLI turns any of them into one line `error: ...`
and exit code 1 (pipeline/cli.py); anything else is a bug and keeps its traceback.

Each message names the file, option or setting and the problem, and where two values disagree, both.
"""


class DebertaDSError(Exception):
    """A failure a user can cause and fix: bad input, a setting, a file, a launch."""


class ConfigError(DebertaDSError, ValueError):
    """A run config, DeepSpeed config, fine-tuning setting or command-line option that cannot work."""


class DataError(DebertaDSError, ValueError):
    """Input data that cannot be used: corpus files, shards, SuperGLUE files (names the file and line)."""


class CheckpointError(DebertaDSError, ValueError):
    """A training checkpoint that is missing, damaged or from another run (names the file)."""


class ReleaseError(DebertaDSError, ValueError):
    """A release directory that does not fit the model, or cannot be read or written (names file and key)."""


class LaunchError(DebertaDSError, RuntimeError):
    """The launcher's variables are incomplete or inconsistent; the message says what to set."""


class RunLockedError(DebertaDSError, RuntimeError):
    """Another run holds the output directory."""


class OutputError(DebertaDSError, OSError):
    """An output that cannot be written: names the path and the OS error (disk full, permissions)."""
