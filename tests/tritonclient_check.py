"""tritonclient itself against a diffuserve server's inference.GRPCInferenceService; run by tests/test_oip.py in its
own venv (tritonclient's generated `inference` protos collide with diffuserve's in one process, and it wants
protobuf < 7 where diffuserve needs >= 7).

    python tritonclient_check.py HOST:PORT MODEL PROMPT SEED STEPS OUT_DIR

Writes OUT_DIR/image.npy and OUT_DIR/seed.npy, and prints one JSON object: liveness, readiness, both metadata and
the status and message of a request with a bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main(url: str, model: str, prompt: str, seed: int, steps: int, out: Path) -> dict:
    client = grpcclient.InferenceServerClient(url)
    report = {
        "server_live": client.is_server_live(),
        "server_ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
    }

    inputs = [
        grpcclient.InferInput("prompt", [1], "BYTES"),
        grpcclient.InferInput("seed", [1], "INT64"),
        grpcclient.InferInput("steps", [1], "INT32"),
    ]
    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([seed], dtype=np.int64))
    inputs[2].set_data_from_numpy(np.array([steps], dtype=np.int32))
    outputs = [grpcclient.InferRequestedOutput("image"), grpcclient.InferRequestedOutput("seed")]
    result = client.infer(model, inputs, outputs=outputs, request_id="tritonclient-check")
    response = result.get_response(as_json=True)
    report["response_id"] = response.get("id")
    report["response_parameters"] = response.get("parameters")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "image.npy", result.as_numpy("image"))
    np.save(out / "seed.npy", result.as_numpy("seed"))

    inputs[2].set_data_from_numpy(np.array([100_000], dtype=np.int32))
    try:
        client.infer(model, inputs)
        report["bad_request"] = None
    except InferenceServerException as e:
        report["bad_request"] = {"status": e.status(), "message": e.message()}
    client.close()
    return report


if __name__ == "__main__":
    url, model, prompt, seed, steps, out = sys.argv[1:]
    print(json.dumps(main(url, model, prompt, int(seed), int(steps), Path(out))))
