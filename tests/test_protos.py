"""The generated stubs never drift from the .proto: regenerate and compare byte for byte."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

from diffuserve.server.noise import NOISE_MODES
from diffuserve.server.params import (
    FORMAT_PREFIX,
    IMAGE_FORMATS,
    noise_mode_enum,
    noise_mode_name,
    scheduler_enum,
    scheduler_name,
)
from diffuserve.server.schedulers import SAMPLERS
from diffuserve.v1 import diffusion_pb2 as pb

PROTOS = Path(__file__).resolve().parents[1] / "protos"
GENERATED = ("diffusion_pb2.py", "diffusion_pb2.pyi", "diffusion_pb2_grpc.py")


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    status = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(PROTOS / "diffuserve" / "v1" / "diffusion.proto"),
        ]
    )
    assert status == 0
    for name in GENERATED:
        fresh = (tmp_path / "diffuserve" / "v1" / name).read_text()
        committed = (PROTOS / "diffuserve" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make protos`"


def test_the_api_scheduler_enum_is_exactly_the_sampler_set() -> None:
    assert {scheduler_enum(name) for name in SAMPLERS} == set(pb.Scheduler.values()) - {pb.SCHEDULER_UNSPECIFIED}
    assert [scheduler_name(scheduler_enum(name)) for name in SAMPLERS] == list(SAMPLERS)


def test_the_api_noise_mode_enum_is_exactly_the_noise_mode_set() -> None:
    assert {noise_mode_enum(mode) for mode in NOISE_MODES} == set(pb.NoiseMode.values()) - {pb.NOISE_MODE_UNSPECIFIED}
    assert [noise_mode_name(noise_mode_enum(mode)) for mode in NOISE_MODES] == list(NOISE_MODES)


def test_every_image_format_has_an_api_enum_value() -> None:
    assert {pb.ImageFormat.Value(FORMAT_PREFIX + f.upper()) for f in IMAGE_FORMATS} == set(pb.ImageFormat.values()) - {
        pb.IMAGE_FORMAT_UNSPECIFIED
    }
