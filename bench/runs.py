"""What the benches that launch `deberta-ds` share: the checkout's root, a CLI call that stops the bench with
the command's error, and a free port for torchrun. Imported as `runs` (a bench runs as `python bench/X.py`, so
bench/ is on sys.path)."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, env):
    """`deberta-ds ARGS` from the checkout; the bench stops with the command's error if it fails."""
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"deberta-ds {args[0]} failed:\n{result.stderr[-3000:]}")
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
