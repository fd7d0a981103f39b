#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one command:
#
#     bash scripts/gpu_checks.sh [RESULTS_DIR]
#
# Installs gptdeploy with its gpu and ort-trt extras into the current Python environment (a CUDA build
# of torch, onnxruntime-gpu in place of onnxruntime, and TensorRT 10 from NVIDIA's package index: the
# version onnxruntime-gpu's TensorRT provider links, libnvinfer.so.10; the trt runtime runs on it too),
# then runs
#   1. the GPU tests (pytest -m gpu),
#   2. parity of ort-cuda, trt and ort-trt against torch, fp32 and fp16,
#   3. the benchmark of hf, torch, ort-cuda, trt and ort-trt on gpt2 (random weights), fp32 and fp16,
# and writes everything into RESULTS_DIR (default: gpu-results-DATE): environment.txt, one .txt log
# per step (JSON reports beside them) and summary.txt with each step's exit code. A failing step
# does not stop the others; the script exits 1 if any step failed.
#
# Environment: PYTHON (default python), PARITY_SOURCE (default shakespeare, the packaged trained
# model), SKIP_INSTALL=1 to use the environment as it is, WHEELS=DIR to install from a folder of wheels
# only (a machine without a network: copy onnxruntime-gpu, tensorrt-cu13 and their dependencies there).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${1:-gpu-results-$(date +%Y%m%d-%H%M%S)}"
PARITY_SOURCE="${PARITY_SOURCE:-shakespeare}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"
failed=0

step() {  # step NAME COMMAND...: runs COMMAND, its output into $OUT/NAME.txt, its exit code into the summary
    local name=$1; shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc ($*)" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || failed=1
}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    if [ -n "${WHEELS:-}" ]; then SOURCES=(--no-index --find-links "$WHEELS"); else
        SOURCES=(--extra-index-url https://pypi.nvidia.com); fi
    # torch from PyPI is a CUDA build on Linux; keep the installed one if it already is
    "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null \
        || step install-torch "$PY" -m pip install "${SOURCES[@]}" --force-reinstall torch
    # onnxruntime (CPU) and onnxruntime-gpu install the same module: keep only the GPU build
    step remove-ort-cpu "$PY" -m pip uninstall -y onnxruntime onnxruntime-gpu
    step install-extras "$PY" -m pip install "${SOURCES[@]}" -e '.[test,gpu,ort-trt]'
fi

# ONNX Runtime's TensorRT provider loads libnvinfer at run time: point the loader at the pip wheels' copy
TRT_LIBS=$("$PY" - <<'EOF'
import glob, os, site
dirs = {os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(os.path.join(d, "tensorrt*", "libnvinfer.so*"))}
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="${TRT_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step environment bash -c "nvidia-smi; '$PY' - <<'EOF'
import platform, torch, onnxruntime
print('python', platform.python_version(), platform.platform())
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available() and torch.cuda.get_device_name())
print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())
try:
    import tensorrt
    print('tensorrt', tensorrt.__version__)
except ImportError as e:
    print('tensorrt not importable:', e)
from gptdeploy.runtimes.registry import RUNTIMES
for name, spec in RUNTIMES.items():
    print(f'runtime {name}:', '; '.join(spec.missing()) or 'available')
try:
    from gptdeploy.runtimes.ort_trt import provider_problem
    print('ONNX Runtime TensorRT provider:', provider_problem())
except ImportError as e:
    print('ONNX Runtime TensorRT provider: not importable:', e)
EOF"

step pytest-gpu "$PY" -m pytest -m gpu -rs -v --junitxml="$OUT/pytest-gpu.xml" tests

for precision in fp32 fp16; do
    step "parity-$PARITY_SOURCE-$precision" "$PY" -m gptdeploy parity "$PARITY_SOURCE" \
        --runtimes torch,ort-cuda,trt,ort-trt --precision "$precision" --json "$OUT/parity-$PARITY_SOURCE-$precision.json"
    step "bench-gpt2-$precision" "$PY" -m gptdeploy bench gpt2 --random --runtime hf,torch,ort-cuda,trt,ort-trt \
        --precision "$precision" --batch 1,8 --json "$OUT/bench-gpt2-$precision.json"
done

echo "Results in $OUT/ (summary.txt lists each step's exit code)"
exit "$failed"
