#!/usr/bin/env bash
# The GPU benchmark in one short go (about 3-5 minutes on an H100), from the repository root:
#   bash bench/gpu.sh            -> $OUT/gpu_bench.txt (or ./gpu_bench.txt without $OUT)
# Needs torch with CUDA (never installed here). Installs transformers if it is missing; where the
# machine has no network the install fails fast and the benchmark runs ours alone.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
REPORT="${OUT:-.}/gpu_bench.txt"

missing=$("$PY" -c "import importlib.util as u; print(' '.join(p for p in ('transformers', 'safetensors', 'sentencepiece') if u.find_spec(p) is None))")
if [ -n "$missing" ]; then
    echo "installing: $missing"
    # --no-deps would miss tokenizers/huggingface_hub; torch is already there, so pip leaves it alone
    timeout 60 "$PY" -m pip install -q --timeout 10 --retries 0 $missing || echo "pip install failed: running without $missing"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
# the whole run stays under 6 minutes: the report is written section by section, so a cut keeps what is done
timeout 300 "$PY" bench/gpu.py --out "$REPORT" "$@"
status=$?
[ $status -eq 124 ] && echo "gpu.py hit the 300 s limit; partial report in $REPORT" | tee -a "$REPORT"
exit $status
