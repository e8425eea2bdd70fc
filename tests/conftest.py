"""Shared fixtures: one tiny random SD model, built and exported once per session, served on a loopback port."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from diffuserve.export.exporter import ExportOptions, export_model
from diffuserve.export.tiny import TINY_MODELS, build_tiny_model
from diffuserve.server.app import BackgroundServer, ServerConfig
from diffuserve.server.models import ServedModel, load_model
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

TINY_SIZE = 128
# A second, non-square size (width x height): several sizes served from one graph per component.
TINY_SIZES = ((TINY_SIZE, TINY_SIZE), (192, TINY_SIZE))
TINY_NAME = "tiny-sd"
# The tiny models of every family: one small size, batches 1 and 2 (U-Net rows 1, 2 and 4), one long-prompt length.
FAMILY_OPTIONS = {"sizes": ((64, 64),), "batches": (1, 2), "text_lengths": (77, 154)}
# SDXL also to the fp16 targets: its VAE stays fp32 there, its time ids too.
FAMILY_TARGETS = {"sdxl": ("cpu", "cuda", "tensorrt")}


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / TINY_NAME)


@pytest.fixture(scope="session")
def tiny_export(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported") / TINY_NAME
    # Two batch sizes, so batching and the choice of the smallest engine that fits are exercised.
    export_model(tiny_source, out, ExportOptions(sizes=TINY_SIZES, batches=(1, 2), name=TINY_NAME))
    return out


@pytest.fixture(scope="session")
def tiny_cuda_export(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both targets; without a GPU the cuda target's gate runs its fp16 graphs before fusion on the CPU."""
    out = tmp_path_factory.mktemp("exported") / f"{TINY_NAME}-cuda"
    options = ExportOptions(sizes=TINY_SIZES[:1], batches=(1, 2), targets=("cpu", "cuda"), name=TINY_NAME)
    export_model(tiny_source, out, options)
    return out


@pytest.fixture(scope="session")
def tiny_tensorrt_export(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cpu and tensorrt targets at both sizes and two batch sizes: four profiles per image-sized component."""
    out = tmp_path_factory.mktemp("exported") / f"{TINY_NAME}-tensorrt"
    options = ExportOptions(sizes=TINY_SIZES, batches=(1, 2), targets=("cpu", "tensorrt"), name=TINY_NAME)
    export_model(tiny_source, out, options)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_export: Path) -> ServedModel:
    return load_model(tiny_export, backend="cpu")


@pytest.fixture(scope="session")
def server(tiny_model: ServedModel):
    config = ServerConfig(model_dirs=(str(tiny_model.folder),), host="127.0.0.1", port=0, backend="cpu")
    with BackgroundServer(config, {tiny_model.name: tiny_model}) as running:
        yield running


@pytest.fixture(scope="session")
def channel(server: BackgroundServer):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.DiffusionServiceStub:
    return pb_grpc.DiffusionServiceStub(channel)


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory):
    """name -> (served model, source folder) of the tiny model of that family (export.tiny.TINY_MODELS), built,
    exported and loaded on the cpu backend on first use, once per session."""
    built: dict[str, tuple[ServedModel, Path]] = {}

    def get(name: str) -> tuple[ServedModel, Path]:
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            source = build_tiny_model(root / "source", **TINY_MODELS[name])
            targets = FAMILY_TARGETS.get(name, ("cpu",))
            export_model(source, root / name, ExportOptions(**FAMILY_OPTIONS, targets=targets, name=name))
            built[name] = (load_model(root / name, backend="cpu"), source)
        return built[name]

    return get
