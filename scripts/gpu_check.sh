#!/usr/bin/env bash
# The GPU check: onnxruntime-gpu in its own venv, the server on CUDA, its answers against CPU,
# and bench_server / bench_batching on CUDA. Run from the repository root on a machine with an
# NVIDIA GPU and driver:
#
#     bash scripts/gpu_check.sh            # everything; figures go to runs/gpu_check/*.txt
#     DEVICE=cpu VENV=.venv SKIP_INSTALL=1 SERVER_ARGS="--seconds 1 --rounds 1" \
#         BATCHING_ARGS="--seconds 1 --steps 16 --prefix 8" bash scripts/gpu_check.sh   # the CPU dry run
#
# DEVICE (cuda) is the device under test; VENV (.venv-gpu) the venv it makes with
# `make install ORT=gpu` (never the CPU .venv: one onnxruntime build per venv); SKIP_INSTALL=1
# uses VENV as it is; SERVER_ARGS / BATCHING_ARGS go to bench_server / bench_batching.
# On a GPU machine without network, install onnxruntime-gpu and the rest from wheels yourself,
# then run with SKIP_INSTALL=1 and VENV set to that Python's prefix (README, Benchmarks, "GPU").
set -euo pipefail
DEVICE=${DEVICE:-cuda}
VENV=${VENV:-.venv-gpu}
SERVER_ARGS=${SERVER_ARGS:-}
BATCHING_ARGS=${BATCHING_ARGS:-}
OUT=runs/gpu_check
mkdir -p "$OUT"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    make install VENV="$VENV" ORT=gpu
    # onnxruntime-gpu loads CUDA and cuDNN from the system or from NVIDIA's wheels; its `cuda` and
    # `cudnn` extras name the wheels that match the build installed (CUDA 12 or 13)
    ORT_VERSION=$("$VENV/bin/python" -c 'import onnxruntime as o; print(o.__version__)')
    "$VENV/bin/pip" install -q "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION"
fi
PY="$VENV/bin/python"
# NVIDIA's wheels put their libraries under site-packages/nvidia/*/lib: make them findable.
NV_LIBS=$("$PY" - <<'PYEOF'
import glob, os, site
dirs = []
for root in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib")))
    dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "*", "lib")))   # cu13 wheels nest deeper
print(":".join(dirs))
PYEOF
)
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

{
    date -u
    uptime
    if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
    "$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
} | tee "$OUT/machine.txt"

"$PY" -m bench.gpu_check --device "$DEVICE" | tee "$OUT/answers.txt"
# shellcheck disable=SC2086  # *_ARGS are lists of flags
"$PY" -m bench.bench_server --device "$DEVICE" --concurrency 1 8 32 $SERVER_ARGS | tee "$OUT/bench_server.txt"
# shellcheck disable=SC2086
"$PY" -m bench.bench_batching --device "$DEVICE" $BATCHING_ARGS | tee "$OUT/bench_batching.txt"
echo "GPU check done ($DEVICE): $OUT/"
