"""Running a test file's check in Triton's interpreter on the CPU: TRITON_INTERPRET=1 is read when triton
is imported, so each check runs in a fresh process (the test file run as a script, its case as JSON in
argv[1], its result as JSON on the last line of stdout). Skips only where triton has no wheel (it is a dev
dependency on Linux x86-64)."""
import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_interpreted(script, case, timeout=600):
    if not (platform.system() == "Linux" and platform.machine() == "x86_64"):
        pytest.skip("triton has wheels for Linux x86-64 only")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, script, json.dumps(case)], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
