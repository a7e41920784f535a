#!/usr/bin/env bash
# make gpu-check: everything srvit claims about NVIDIA GPUs, in one command on a bare machine with a GPU, its driver
# and PyPI (and apt, for the Fashion-MNIST package) within reach. About 8 minutes; every step is timed and bounded.
#
#   1. a virtual environment of its own (.venv-gpu): torch, the export and test extras, onnxruntime-gpu and
#      tensorrt-cu12 at the versions docker/Dockerfile.gpu installs, Polygraphy;
#   2. pytest -m gpu (TensorRT export and runtime tests that skip everywhere else);
#   3. srvit export --trt --precision fp16 of srvit_fashion (the embedded checkpoint) and of a random-weight
#      srvit_small_patch16_224, every depth, parity against ONNX Runtime checked by the export itself;
#   4. each model served with SRVIT_PROVIDERS=tensorrt, its runtime per depth read back from /v1/models, and every
#      depth benchmarked with `srvit bench load` (closed loop, concurrency 1 and 32);
#   5. one summary (stdout and $OUT_DIR/summary.md, rows in $OUT_DIR/*.json) to commit under docs/benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${GPU_CHECK_VENV:-.venv-gpu}
OUT_DIR=${GPU_CHECK_OUT:-runs/gpu-check}
PYTHON=${PYTHON:-python3}
# The versions docker/Dockerfile.gpu pins (tests/docker/test_gpu_check.py keeps the two in step).
ONNXRUNTIME_GPU_VERSION=1.31.1
TENSORRT_VERSION=11.4.0.106
TORCH=torch==2.13.0
BENCH_S=${GPU_CHECK_BENCH_S:-4}

started=$(date +%s)
step() { printf '\n== [%4ss] %s\n' "$(($(date +%s) - started))" "$*"; }
fail() { printf 'gpu-check: %s\n' "$*" >&2; exit 1; }

command -v nvidia-smi >/dev/null || fail "no nvidia-smi: this needs an NVIDIA GPU with its driver"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || fail "nvidia-smi sees no GPU"
mkdir -p "$OUT_DIR"

step "install: $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
timeout 300 "${PIP[@]}" "$TORCH"
timeout 120 "${PIP[@]}" -e '.[test]' "polygraphy>=0.49"
"$VENV/bin/python" -m pip uninstall --quiet -y onnxruntime
timeout 180 "${PIP[@]}" "onnxruntime-gpu==$ONNXRUNTIME_GPU_VERSION" "tensorrt-cu12==$TENSORRT_VERSION"
"$VENV/bin/python" - <<'EOF'
import onnxruntime, tensorrt
from modelrepo.gpu import find_gpu
print(f"onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}, tensorrt {tensorrt.__version__}, "
      f"GPU {find_gpu()}")
assert "CUDAExecutionProvider" in onnxruntime.get_available_providers() and find_gpu() is not None
EOF
if command -v apt-get >/dev/null; then timeout 120 make --no-print-directory debian-packages; fi

step "pytest -m gpu"
timeout 240 "$VENV/bin/python" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT_DIR/pytest-gpu.txt"

REPO_FASHION="$OUT_DIR/repo_fashion"
REPO_SMALL="$OUT_DIR/repo_small"
rm -rf "$REPO_FASHION" "$REPO_SMALL"
step "export srvit_fashion --trt --precision fp16"
timeout 240 "$VENV/bin/srvit" export srvit/checkpoints/srvit_fashion.safetensors --name srvit_fashion \
    --repo "$REPO_FASHION" --trt --precision fp16

step "export a random-weight srvit_small_patch16_224 --trt --precision fp16"
"$VENV/bin/python" - "$OUT_DIR/srvit_small_random.safetensors" <<'EOF'
import sys
import torch
from srvit.checkpoint import save_checkpoint
from srvit.registry import create_model
torch.manual_seed(0)
imagenet = {"input_size": 224, "resize_size": 256, "channels": "RGB", "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
meta = {"labels": [f"class_{i}" for i in range(1000)], "preprocessing": imagenet, "model": "srvit_small_patch16_224",
        "training": {"dataset": "synthetic"}}
save_checkpoint(sys.argv[1], create_model("srvit_small_patch16_224").eval(), meta)
EOF
timeout 360 "$VENV/bin/srvit" export "$OUT_DIR/srvit_small_random.safetensors" --name srvit_small \
    --repo "$REPO_SMALL" --trt --precision fp16 --parity-images 64

serve_and_bench() {  # name repo port
    local name=$1 repo=$2 port=$3
    step "serve $name on TensorRT, benchmark every depth"
    SRVIT_PROVIDERS=tensorrt SRVIT_LOG_LEVEL=warning "$VENV/bin/srvit" serve --repo "$repo" --host 127.0.0.1 \
        --port "$port" >"$OUT_DIR/serve-$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 240); do
        curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
        kill -0 "$pid" 2>/dev/null || { cat "$OUT_DIR/serve-$name.log"; fail "$name: the server exited"; }
        sleep 0.5
    done
    curl -fsS "http://127.0.0.1:$port/v1/models" >"$OUT_DIR/models-$name.json"
    local depths
    depths=$("$VENV/bin/python" -c "import json,sys; m=json.load(open(sys.argv[1]))['models'][0]; \
print(','.join(str(d['depth']) for d in m['depths']))" "$OUT_DIR/models-$name.json")
    timeout 200 "$VENV/bin/srvit" bench load --url "http://127.0.0.1:$port" --depth "$depths,auto" \
        --concurrency 1,32 --duration "$BENCH_S" --warmup 1 --json "$OUT_DIR/bench-$name.json"
    kill -TERM "$pid"; kill -TERM "$pid" 2>/dev/null || true  # the second signal skips the shutdown delay
    wait "$pid" || true
}
serve_and_bench srvit_fashion "$REPO_FASHION" 18000
serve_and_bench srvit_small "$REPO_SMALL" 18001

step "summary"
"$VENV/bin/python" - "$OUT_DIR" "$(($(date +%s) - started))" <<'EOF' | tee "$OUT_DIR/summary.md"
import json, pathlib, platform, subprocess, sys
out, seconds = pathlib.Path(sys.argv[1]), sys.argv[2]
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
import onnxruntime, tensorrt
print(f"# gpu-check: {gpu}; TensorRT {tensorrt.__version__}, onnxruntime-gpu {onnxruntime.__version__}, "
      f"Python {platform.python_version()}; {seconds} s in all\n")
print("pytest -m gpu: " + (out / "pytest-gpu.txt").read_text().strip().splitlines()[-1] + "\n")
failed = []
for name in ("srvit_fashion", "srvit_small"):
    model = json.loads((out / f"models-{name}.json").read_text())["models"][0]
    runtimes = {d["depth"]: d["runtime"] for d in model["depths"]}
    failed += [f"{name} depth {d} ran on {r}, not TensorRT" for d, r in runtimes.items() if r != "TensorRT"]
    print(f"## {name}: {model['input_shape']}, runtime per depth {runtimes}\n")
    print("| depth | concurrency | images/s | p50 ms | p99 ms | depth mix | errors |")
    print("|---|---|---|---|---|---|---|")
    for row in json.loads((out / f"bench-{name}.json").read_text())["rows"]:
        latency, mix = row["latency_ms"], ", ".join(f"{d}: {share:.0%}" for d, share in row["depth_mix"].items())
        print(f"| {row['depth']} | {row['concurrency']} | {row['images_per_s']:.0f} | {latency['p50']:.2f} | "
              f"{latency['p99']:.2f} | {mix} | {row['errors'] or 0} |")
        if row["errors"] or not row["ok"]:
            failed.append(f"{name} depth {row['depth']} c={row['concurrency']}: errors {row['errors']}")
    print()
for line in failed:
    print(f"FAILED: {line}")
sys.exit(1 if failed else 0)
EOF
