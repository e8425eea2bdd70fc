#!/usr/bin/env bash
# The GPU check, on the lent NVIDIA machine (H200), in the project's root, after the wheel pieces have arrived in
# .gpu/ (see deploy/gpu/README.md): installs the carried wheels, then builds the synthetic SD 1.5, exports it for the
# cuda target, checks the decoded image against diffusers fp16 and CUDA-graph replay against eager, and times ours
# against diffusers fp16 + SDPA in the same run, printing one table. Everything is cached under /tmp, so a rerun on
# the same (still warm) machine picks up where the last one stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${OUT:-/tmp/diffuserve-gpu-out}
site=${SITE:-/tmp/site}
work=${WORK:-/tmp/diffuserve-synthetic/sd15}
steps=${STEPS:-30}
runs=${RUNS:-3}
mkdir -p "$out"
# Everything also goes to $OUT, which comes back even when the call runs out of time.
exec > >(tee -a "$out/check.log") 2>&1

step() { printf '\n== [%4ds] %s\n' "$SECONDS" "$1"; }

step "install the carried wheels into $site"
if [[ -f "$site/.diffuserve-installed" ]]; then
    echo "already installed by an earlier run on this machine"
else
    if ! compgen -G ".gpu/part.*" >/dev/null; then
        echo "no .gpu/part.* here: carry the pieces ../shared/gpu/pack.sh made first (deploy/gpu/README.md)"
        exit 2
    fi
    # The same as ../shared/gpu/unpack.sh (shared/ does not travel), plus wheels carried loose in .whl/.
    rm -rf /tmp/wheels
    cat .gpu/part.* | tar -C /tmp -xf -
    wheels=(/tmp/wheels/*.whl)
    if compgen -G ".whl/*.whl" >/dev/null; then wheels+=(.whl/*.whl); fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
    # The project, importable as diffuserve.* without a build (its package-dir mapping as links).
    mkdir -p "$site/diffuserve"
    for d in export engine server; do ln -sfn "$PWD/$d" "$site/diffuserve/$d"; done
    ln -sfn "$PWD/protos/diffuserve/v1" "$site/diffuserve/v1"
    touch "$site/.diffuserve-installed"
    ls "$site"
fi

# The carried packages come first on the path: onnxruntime-gpu in $site shadows the machine's CPU onnxruntime as a
# whole package (same import name, different folders), so only one of the two is importable; nothing is uninstalled.
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# onnxruntime-gpu's CUDA provider loads CUDA 13's cuBLAS/cuFFT/cuRAND and cuDNN 9 by soname; on this machine they
# live in the nvidia-* wheels beside torch, which are not on the loader's path.
nvidia_libs=$(python3 - <<'EOF'
import importlib.util
from pathlib import Path

spec = importlib.util.find_spec("nvidia")
roots = list(spec.submodule_search_locations or []) if spec else []
print(":".join(sorted({str(p.parent) for root in roots for p in Path(root).glob("**/lib/lib*.so*")})))
EOF
)
export LD_LIBRARY_PATH="${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step "what runs here"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || true
SITE="$site" python3 - <<'EOF'
import importlib
import os
import sys

# Module, and the distribution to carry when it is missing or too old (deploy/gpu/README.md lists the versions).
needed = {
    "torch": "torch (the machine's)",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "tokenizers": "tokenizers",
    "onnx": "onnx",
    "google.protobuf": "protobuf",
    "grpc": "grpcio",
    "PIL": "pillow",
    "onnxruntime": "onnxruntime-gpu",
    "onnxruntime.transformers.optimizer": "onnxruntime-gpu",
    "diffuserve.v1.diffusion_pb2_grpc": "protobuf and grpcio as new as the stubs",
    "diffuserve.server.tools.synthetic": "grpcio-health-checking, grpcio-reflection (server.app)",
}
problems = []
for module, dist in needed.items():
    try:
        imported = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is a missing or mismatched package here
        problems.append(f"{module}: {type(e).__name__}: {e} -> carry {dist}")
        continue
    print(f"  {module:<36} {getattr(imported, '__version__', ''):<14} {getattr(imported, '__file__', '')}")
if problems:
    sys.exit("cannot run the check:\n  " + "\n  ".join(problems))

import torch  # first: the CUDA libraries it loads serve onnxruntime's CUDA provider too
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

site = os.environ["SITE"]
if not ort.__file__.startswith(site):
    sys.exit(f"onnxruntime comes from {ort.__file__}, not the carried onnxruntime-gpu in {site}")
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
# onnxruntime lists the CUDA provider whenever it is built in, and falls back to the CPU silently when its
# libraries do not load: run one real node with the fallback off, and ask the session what it runs on.
node = helper.make_node("Add", ["x", "x"], ["y"])
graph = helper.make_graph(
    [node],
    "probe",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
)
options = ort.SessionOptions()
options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = ort.InferenceSession(
    model.SerializeToString(), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
)
result = session.run(None, {"x": np.ones(4, np.float32)})[0]
if session.get_providers()[0] != "CUDAExecutionProvider" or result.tolist() != [2.0] * 4:
    sys.exit(f"onnxruntime's CUDA provider does not run here: the session runs on {session.get_providers()}")
print(f"  CUDA provider runs on {torch.cuda.get_device_name()}; onnxruntime {ort.__version__}, onnx {onnx.__version__}")
EOF

step "synthetic SD 1.5: build, export --target cuda, image parity, CUDA graphs, ours against diffusers fp16"
status=0
python3 - "$work" "$out/synthetic-sd15-cuda.json" "$steps" "$runs" <<'EOF' || status=$?
import logging
import sys

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
for noisy in ("httpx", "urllib3", "filelock"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

from diffuserve.server.tools.synthetic import SyntheticOptions, checks_passed, run_synthetic_bench

work, json_path, steps, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
options = SyntheticOptions(kind="sd15", target="cuda", steps=steps, runs=runs, work=work)
report = run_synthetic_bench(options, json_path=json_path)
sys.exit(0 if checks_passed(report) else 1)
EOF
cp "$work/export-cuda/manifest.json" "$out/manifest-sd15-cuda.json" 2>/dev/null || true

step "done: $([[ $status == 0 ]] && echo 'GPU CHECK PASSED' || echo "GPU CHECK FAILED (exit $status)")"
exit "$status"
