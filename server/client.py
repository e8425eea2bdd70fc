"""The `diffuserve generate` client: one request over gRPC, images written to files."""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from .app import CHANNEL_OPTIONS
from .params import format_enum, noise_mode_enum, scheduler_enum
from .security import channel_credentials

FILE_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
# float32 on the wire holds about 7 significant digits.
FLOAT32_DIGITS = 7


def float32_decimal(value: float) -> float:
    """A float32 field as the decimal it was written as (7.5, 3.3), not its binary expansion (3.299999952316284)."""
    return float(f"{value:.{FLOAT32_DIGITS}g}")


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


# Retries, and the balancing policy, as service config rather than client loops: gRPC retries a call refused before
# any response (a replica draining answers UNAVAILABLE, a full queue RESOURCE_EXHAUSTED with grpc-retry-pushback-ms,
# which the retry honours over its own backoff), on another replica where there are several.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    # Client-side health checking: a replica whose health turns NOT_SERVING (draining) leaves the rotation as soon
    # as its Watch stream says so, before any call is refused by it.
    "healthCheckConfig": {"serviceName": "diffuserve.v1.DiffusionService"},
    "methodConfig": [
        {
            "name": [{"service": "diffuserve.v1.DiffusionService"}],
            "retryPolicy": {
                # gRPC's ceiling: 5 attempts.
                "maxAttempts": 5,
                "initialBackoff": "0.2s",
                "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            },
        }
    ],
}


@dataclass(frozen=True)
class Connection:
    """Where and how a client reaches diffuserve: one or several addresses (balanced round-robin), TLS, a token."""

    addresses: tuple[str, ...]
    # TLS: the CA to trust (None with tls: the system's); a certificate and key for mutual TLS.
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None

    @property
    def target(self) -> str:
        """One address as it is (host:port, or a resolver URI such as dns:///name:port, whose addresses are all
        used); several host:port as gRPC's static list, which round-robin spreads calls over."""
        if len(self.addresses) == 1:
            return self.addresses[0]
        return "ipv4:" + ",".join(self.addresses)

    def channel(self) -> grpc.Channel:
        options = [*CHANNEL_OPTIONS, ("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1)]
        if self.tls:
            credentials = channel_credentials(self.tls_ca, self.tls_cert, self.tls_key)
            return grpc.secure_channel(self.target, credentials, options=options)
        return grpc.insecure_channel(self.target, options=options)

    def plain_channel(self) -> grpc.Channel:
        """A channel with grpcio's own defaults (limits, no retries, first address first) but this connection's TLS
        and token: what a bare client sends, for the fuzzer, whose cases set their own call metadata."""
        if self.tls:
            channel = grpc.secure_channel(self.target, channel_credentials(self.tls_ca, self.tls_cert, self.tls_key))
        else:
            channel = grpc.insecure_channel(self.target)
        return grpc.intercept_channel(channel, TokenInterceptor(self.metadata)) if self.token else channel

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The token as call metadata (not call credentials: those need TLS, and a TLS-terminating proxy may sit in
        front of a plaintext port)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the token to every call's own metadata."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        # grpcio's call details are a namedtuple; only the metadata changes.
        return details._replace(metadata=(*(details.metadata or ()), *self.metadata))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def is_ipv4_address(address: str) -> bool:
    """HOST:PORT with an IPv4 literal host: what gRPC's static `ipv4:` target list takes."""
    host, _, port = address.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return port.isdigit()


def connection(addresses: str | Sequence[str], **settings) -> Connection:
    """A Connection from one address or several (a comma-separated string or a sequence)."""
    if isinstance(addresses, str):
        addresses = [a.strip() for a in addresses.split(",")]
    addresses = tuple(a for a in addresses if a)
    if not addresses:
        raise ValueError("--server: give at least one HOST:PORT")
    if len(addresses) > 1 and not all(map(is_ipv4_address, addresses)):
        raise ValueError(
            "--server: several addresses must be IPv4 HOST:PORT; for a name with several addresses give one "
            "dns:///NAME:PORT"
        )
    return Connection(addresses, **settings)


def request_generate(
    server: str | Connection, request: pb.GenerateRequest, timeout_s: float | None = None
) -> pb.GenerateResponse:
    link = server if isinstance(server, Connection) else connection(server)
    with link.channel() as channel:
        return pb_grpc.DiffusionServiceStub(channel).Generate(request, timeout=timeout_s, metadata=link.metadata)


def stream_generate(
    server: str | Connection,
    request: pb.GenerateRequest,
    on_event: Callable[[pb.GenerateEvent], None],
    timeout_s: float | None = None,
) -> pb.GenerateResponse:
    """GenerateStream, reassembled into the response Generate would have given; every event goes to on_event."""
    link = server if isinstance(server, Connection) else connection(server)
    images: list[pb.Image] = []
    with link.channel() as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        for event in stub.GenerateStream(request, timeout=timeout_s, metadata=link.metadata):
            on_event(event)
            if event.HasField("image"):
                images.append(event.image)
            elif event.HasField("completed"):
                response = event.completed
                response.images.extend(images)
                return response
    raise RuntimeError("the stream ended without a completed event")


def bar(share: float, width: int) -> str:
    """[####......]: `share` (0..1) of `width` filled."""
    filled = int(width * min(1.0, max(0.0, share)))
    return f"[{'#' * filled}{'.' * (width - filled)}]"


class ProgressBar:
    """A one-line progress display on stderr, fed with stream events."""

    WIDTH = 30

    def __call__(self, event: pb.GenerateEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "queued":
            line = f"queued: {event.queued.position} ahead"
        elif kind == "progress":
            p = event.progress
            line = f"{bar(p.step / max(1, p.total), self.WIDTH)} step {p.step}/{p.total}, {p.eta_ms / 1e3:.1f} s left"
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
