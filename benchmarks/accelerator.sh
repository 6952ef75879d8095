#!/usr/bin/env bash
# The accelerator checks of docs/benchmarks, in one run of at most 11 minutes on one H100 / H200 (or a TPU):
#   1. every attention call kind of the model, ours (pallas) against jax's shipped kernels (jax: splash on TPU,
#      Pallas mha / gqa decode on GPU) and cuDNN, 8K-64K tokens, dense and 50 % streaming heads, and per call kind
#      the fastest (attention.json "fastest_per_call": what AUTO in qv_jax/attention/backends.py should say);
#   2. sparse decoding at a 64K context against the dense cache;
#   3. end to end, a random model of Qwen2.5-VL-7B's geometry on a generated 1-hour video at 1 fps (3600 frames);
#   4. the LongGen hybrid against the dense model at Qwen2.5-VL-7B's geometry: prefill at 8K-32K and KV bytes
#      (no train step: float32 master weights and AdamW state of 7B do not fit one H100);
#   5. a DuoAttention identification step and forward at Qwen2.5-VL-7B's geometry, 8K and 32K tokens (bfloat16).
# Writes the JSON records, the log and accelerator.md (tables naming the device) to $RESULTS
# (default docs/benchmarks/accelerator). Each step has its own time limit; a step that fails or runs out is
# recorded as missing and the others still run. The limits (120 + 60 + 90 + 180 + 120 + 90 s) add up to 11 minutes.
#
# Usage: benchmarks/accelerator.sh            (from anywhere; with the device tool: RESULTS=$OUT benchmarks/accelerator.sh)
# Knobs for a CPU rehearsal at small sizes: ATTENTION_ARGS, DECODE_ARGS, E2E_ARGS, LONGGEN_ARGS, IDENTIFY_ARGS,
# VIDEO_SECONDS, VIDEO_SIZE.
set -uo pipefail
cd "$(dirname "$0")/.."

# Python packages missing on the machine (PyAV on a bare GPU image) travel as wheels in .whl/, made where pip works:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl av
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
RESULTS=${RESULTS:-docs/benchmarks/accelerator}
mkdir -p "$RESULTS"
LOG="$RESULTS/accelerator.log"
: > "$LOG"

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

$PYTHON -c "import jax; print('devices:', jax.devices())" 2>&1 | tee -a "$LOG"

# shellcheck disable=SC2086  # the knobs are argument lists
step attention 120 $PYTHON -m benchmarks.attention ${ATTENTION_ARGS:---lengths 8192 32768 65536 --fractions 0.0 0.5 --repeats 2} \
    --out "$RESULTS/attention.json"
# shellcheck disable=SC2086
step sparse_decode 60 $PYTHON -m benchmarks.sparse_decode ${DECODE_ARGS:---contexts 65536} \
    --out "$RESULTS/sparse_decode.json"

VIDEO="${TMPDIR:-/tmp}/qv-jax-accelerator-$(id -u)/one_hour.mp4"
step video 90 $PYTHON -c "
import sys
from pathlib import Path
from qv_jax.testing.videos import make_sample_video
path = Path(sys.argv[1])
height, width = map(int, sys.argv[3].split('x'))
if not path.is_file():
    path.parent.mkdir(parents=True, exist_ok=True)
    make_sample_video(path, seconds=float(sys.argv[2]), fps=2.0, size=(height, width), gop=60, bframes=2)
print(path)
" "$VIDEO" "${VIDEO_SECONDS:-3600}" "${VIDEO_SIZE:-180x320}"
# shellcheck disable=SC2086
step e2e 180 $PYTHON -m benchmarks.e2e --video "$VIDEO" ${E2E_ARGS:---preset 7b --fps 1 --max-frames 3600 --no-baseline --repeats 1 --max-new-tokens 16} \
    --out "$RESULTS/e2e.json"
# shellcheck disable=SC2086
step longgen 120 $PYTHON -m benchmarks.longgen ${LONGGEN_ARGS:---preset 7b --lengths 8192 16384 32768 --step-lengths --repeats 2} \
    --out "$RESULTS/longgen.json"
# shellcheck disable=SC2086
step identify 90 $PYTHON -m benchmarks.identify ${IDENTIFY_ARGS:---preset 7b --dtype bfloat16 --lengths 8192 32768 --no-compare --repeats 1} \
    --out "$RESULTS/identify.json"

$PYTHON -m benchmarks.report "$RESULTS/accelerator.md" "$RESULTS/attention.json" "$RESULTS/sparse_decode.json" \
    "$RESULTS/e2e.json" "$RESULTS/longgen.json" "$RESULTS/identify.json" --title "qv-jax on an accelerator (benchmarks/accelerator.sh)" 2>&1 | tee -a "$LOG"
