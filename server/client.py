"""The `diffuserve generate` client: one request over gRPC, images written to files."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from .app import CHANNEL_OPTIONS
from .params import format_enum, noise_mode_enum, scheduler_enum

FILE_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


@dataclass(frozen=True)
class ClientRequest:
    prompt: str
    negative_prompt: str = ""
    model: str = ""
    seeds: tuple[int, ...] = ()
    num_images: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    scheduler: str = ""
    noise_mode: str = ""
    width: int = 0
    height: int = 0
    output_format: str = ""
    quality: int = 0
    embed_metadata: bool = True
    # Image-to-image and inpainting: the files' bytes as read, sent as they are (the server decodes and checks them).
    init_image: bytes = b""
    mask_image: bytes = b""
    strength: float | None = None
    mask_blur: int = 0
    # Refuse an init image of another size instead of resizing it.
    refuse_resize: bool = False

    def to_proto(self) -> pb.GenerateRequest:
        request = pb.GenerateRequest(
            model=self.model,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seeds=self.seeds,
            num_images=self.num_images,
            steps=self.steps,
            width=self.width,
            height=self.height,
            quality=self.quality,
            embed_metadata=self.embed_metadata,
            init_image=self.init_image,
            mask_image=self.mask_image,
            mask_blur=self.mask_blur,
        )
        if self.strength is not None:
            request.strength = self.strength
        if self.refuse_resize:
            request.resize_mode = pb.RESIZE_MODE_REFUSE
        if self.guidance_scale is not None:
            request.guidance_scale = self.guidance_scale
        if self.scheduler:
            request.scheduler = scheduler_enum(self.scheduler)
        if self.noise_mode:
            request.noise_mode = noise_mode_enum(self.noise_mode)
        if self.output_format:
            request.output_format = format_enum(self.output_format)
        return request


def request_generate(address: str, request: pb.GenerateRequest, timeout_s: float | None = None) -> pb.GenerateResponse:
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        return pb_grpc.DiffusionServiceStub(channel).Generate(request, timeout=timeout_s)


def stream_generate(
    address: str,
    request: pb.GenerateRequest,
    on_event: Callable[[pb.GenerateEvent], None],
    timeout_s: float | None = None,
) -> pb.GenerateResponse:
    """GenerateStream, reassembled into the response Generate would have given; every event goes to on_event."""
    images: list[pb.Image] = []
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        for event in pb_grpc.DiffusionServiceStub(channel).GenerateStream(request, timeout=timeout_s):
            on_event(event)
            if event.HasField("image"):
                images.append(event.image)
            elif event.HasField("completed"):
                response = event.completed
                response.images.extend(images)
                return response
    raise RuntimeError("the stream ended without a completed event")


class ProgressBar:
    """A one-line progress display on stderr, fed with stream events."""

    WIDTH = 30

    def __call__(self, event: pb.GenerateEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "queued":
            line = f"queued: {event.queued.position} ahead"
        elif kind == "progress":
            p = event.progress
            filled = self.WIDTH * p.step // max(1, p.total)
            line = (
                f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] step {p.step}/{p.total}, {p.eta_ms / 1e3:.1f} s left"
            )
        elif kind == "completed":
            line = "done\n"
        else:
            return
        sys.stderr.write(f"\r\033[K{line}")
        sys.stderr.flush()


def output_paths(output: Path, count: int, mime_type: str) -> list[Path]:
    """out.png for one image; out-0.png, out-1.png ... for several. The suffix follows the format served."""
    suffix = FILE_SUFFIXES.get(mime_type, output.suffix)
    base = output.with_suffix(suffix)
    if count == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{suffix}") for i in range(count)]


def write_images(response: pb.GenerateResponse, output: Path) -> Sequence[Path]:
    if not response.images:
        return []
    paths = output_paths(output, len(response.images), response.images[0].mime_type)
    for image, path in zip(response.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.data)
    return paths
