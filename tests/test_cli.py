"""The `diffuserve generate` client against a real server: files written, seeds and timings printed, errors shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from diffuserve.server.cli import main


@pytest.mark.parametrize("stream", [False, True])
def test_generate_writes_one_file_per_image(server, tmp_path: Path, capsys, stream: bool) -> None:
    args = ["generate", "a red circle", "--server", server.address, "-o", str(tmp_path / "out.png"), "--steps", "3"]
    args += ["--seed", "7", "--seed", "8"] + (["--stream"] if stream else [])
    assert main(args) == 0
    out = capsys.readouterr().out
    for index, seed in ((0, 7), (1, 8)):
        path = tmp_path / f"out-{index}.png"
        assert Image.open(path).size == (128, 128)
        assert f"{path}  seed={seed}" in out
    assert "total" in out and "denoise" in out


def test_generate_names_the_file_after_the_format(server, tmp_path: Path) -> None:
    args = ["generate", "a red circle", "--server", server.address, "-o", str(tmp_path / "out.png"), "--steps", "2"]
    assert main([*args, "--format", "jpeg"]) == 0
    assert Image.open(tmp_path / "out.jpg").format == "JPEG"


def test_generate_reports_a_refused_request(server, tmp_path: Path, capsys) -> None:
    args = ["generate", "a red circle", "--server", server.address, "-o", str(tmp_path / "x.png"), "--steps", "999"]
    assert main(args) == 1
    assert "INVALID_ARGUMENT: steps: must be in 1..150, got 999" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_generate_edits_an_image_and_the_file_says_so_in_automatic1111s_words(server, tmp_path: Path, capsys):
    Image.new("RGB", (128, 128), (200, 40, 40)).save(tmp_path / "init.png")
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (30, 30, 90, 90))
    mask.save(tmp_path / "mask.png")
    args = ["generate", "a blue square", "--server", server.address, "-o", str(tmp_path / "out.png"), "--steps", "4"]
    args += ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--strength", "0.5"]
    assert main([*args, "--seed", "3", "--mask-blur", "4"]) == 0
    parameters = Image.open(tmp_path / "out.png").text["parameters"]
    assert parameters.startswith("a blue square\nSteps: 4, ") and "Seed: 3" in parameters
    assert "Denoising strength: 0.5" in parameters


def test_generate_names_an_unreadable_input_file(server, tmp_path: Path) -> None:
    args = ["generate", "a circle", "--server", server.address, "--init-image", str(tmp_path / "missing.png")]
    with pytest.raises(SystemExit, match=r"--init-image: cannot read .*missing.png: No such file"):
        main(args)


def test_export_sizes_come_as_width_x_height_or_as_pairs() -> None:
    from diffuserve.server.cli import build_parser, export_sizes

    args = build_parser().parse_args(["export", "src", "-o", "out", "--size", "768x512", "--width", "512"])
    with pytest.raises(ValueError, match="--width and --height come in pairs"):
        export_sizes(args)
    args = build_parser().parse_args(
        ["export", "src", "-o", "out", "--size", "768x512", "--width", "512", "--height", "640"]
    )
    assert export_sizes(args) == ((768, 512), (512, 640))
    assert export_sizes(build_parser().parse_args(["export", "src", "-o", "out"])) == ((512, 512),)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "src", "-o", "out", "--size", "512"])


def test_export_fp32_ops_are_per_component_lists() -> None:
    from diffuserve.server.cli import fp32_ops

    assert fp32_ops(["unet=Softmax,LayerNormalization", "unet=Gemm", "vae_decoder=Resize"]) == {
        "unet": ("Softmax", "LayerNormalization", "Gemm"),
        "vae_decoder": ("Resize",),
    }
    with pytest.raises(ValueError, match="COMPONENT=Op"):
        fp32_ops(["Softmax"])


def test_an_export_that_cannot_start_says_why(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "out"), "--fp32-ops", "unett=Softmax"]) == 1
    assert "export failed: --fp32-ops: unknown component 'unett'" in capsys.readouterr().err
