"""`diffuserve evaluate` and `diffuserve gallery`: the bundled model's drawings, through the served pipeline.

Evaluation sends prompts from the shapes grammar to a real server over gRPC, reads each image back with the
analytic classifier, and reports how often colour and shape came out as asked, per sampler.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from ..app import CHANNEL_OPTIONS, BackgroundServer, ServerConfig
from ..params import scheduler_enum, scheduler_name
from .shapes import Scene, classify, describe, random_scene

ATTRIBUTES = ("fg", "bg", "shape")
# The bundled model's quality bar, per attribute (share of images right).
TARGETS = {"fg": 0.90, "bg": 0.90, "shape": 0.80}


@dataclass(frozen=True)
class Case:
    scene: Scene
    prompt: str
    seed: int


def evaluation_cases(count: int, seed: int = 0) -> list[Case]:
    """Random scenes and wordings from the training grammar, each with its own image seed."""
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(count):
        scene = random_scene(rng)
        cases.append(Case(scene, describe(scene, rng), seed * 1_000_003 + index))
    return cases


@contextmanager
def serving(model_dir: str | Path):
    config = ServerConfig(model_dirs=(str(model_dir),), host="127.0.0.1", port=0)
    with BackgroundServer(config) as server, grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
        yield pb_grpc.DiffusionServiceStub(channel)


def decode(image: pb.Image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))


def draw(stub: pb_grpc.DiffusionServiceStub, prompt: str, seed: int, scheduler: str | None = None) -> np.ndarray:
    request = pb.GenerateRequest(prompt=prompt, seeds=[seed])
    if scheduler:
        request.scheduler = scheduler_enum(scheduler)
    return decode(stub.Generate(request).images[0])


def accuracy(stub: pb_grpc.DiffusionServiceStub, cases: Sequence[Case], scheduler: str) -> dict[str, float]:
    right = dict.fromkeys(ATTRIBUTES, 0)
    for case in cases:
        reading = classify(draw(stub, case.prompt, case.seed, scheduler))
        for attribute in ATTRIBUTES:
            right[attribute] += getattr(reading, attribute) == getattr(case.scene, attribute)
    return {attribute: right[attribute] / len(cases) for attribute in ATTRIBUTES}


def evaluate(
    model_dir: str | Path, count: int = 100, seed: int = 0, samplers: Sequence[str] = ()
) -> dict[str, dict[str, float]]:
    """Accuracy per sampler (default: every one the model offers) and attribute, with the model's default steps and
    guidance."""
    cases = evaluation_cases(count, seed)
    with serving(model_dir) as stub:
        (model,) = stub.ListModels(pb.ListModelsRequest()).models
        samplers = samplers or [scheduler_name(s) for s in model.schedulers]
        return {sampler: accuracy(stub, cases, sampler) for sampler in samplers}


def format_table(results: dict[str, dict[str, float]]) -> str:
    width = max(len(name) for name in [*results, "sampler"]) + 2
    header = f"{'sampler':<{width}}" + "".join(f"{a:>10}" for a in ("fg colour", "bg colour", "shape"))
    rows = [header, "-" * len(header)]
    for sampler, scores in results.items():
        rows.append(f"{sampler:<{width}}" + "".join(f"{scores[a]:>10.1%}" for a in ATTRIBUTES))
    rows.append(f"{'target':<{width}}" + "".join(f"{TARGETS[a]:>10.0%}" for a in ATTRIBUTES))
    return "\n".join(rows)


def meets_targets(results: dict[str, dict[str, float]]) -> bool:
    return all(scores[a] >= TARGETS[a] for scores in results.values() for a in ATTRIBUTES)


GALLERY_PROMPTS = (
    "a red circle on a blue background",
    "a small green triangle at the top left on white",
    "yellow square, purple background",
    "a large white circle on a black background",
    "an orange triangle in the bottom right on a blue background",
    "a picture of a small blue square on a yellow background",
    "black circle, green background",
    "a purple triangle on an orange background",
)


def make_gallery(model_dir: str | Path, output: Path, prompts: Sequence[str] = GALLERY_PROMPTS, seed: int = 1) -> Path:
    """One image per prompt, side by side in rows of four."""
    with serving(model_dir) as stub:
        images = [draw(stub, prompt, seed) for prompt in prompts]
    columns = 4
    images += [np.full_like(images[0], 255)] * (-len(images) % columns)
    rows = [np.concatenate(images[i : i + columns], axis=1) for i in range(0, len(images), columns)]
    output.parent.mkdir(parents=True, exist_ok=True)
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    # Doubled with nearest-neighbour so 64-pixel drawings stay legible on a web page without inventing detail.
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(output)
    return output
