"""The generated stubs never drift from the .proto: regenerate and compare byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

from diffuserve.server.params import FORMAT_PREFIX, IMAGE_FORMATS, scheduler_enum
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


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_has_an_api_enum_value(name: str) -> None:
    assert scheduler_enum(name) != pb.SCHEDULER_UNSPECIFIED


def test_every_image_format_has_an_api_enum_value() -> None:
    assert {pb.ImageFormat.Value(FORMAT_PREFIX + f.upper()) for f in IMAGE_FORMATS} == set(pb.ImageFormat.values()) - {
        pb.IMAGE_FORMAT_UNSPECIFIED
    }
