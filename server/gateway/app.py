"""The gateway's HTTP side: Starlette routes over one gRPC channel to the service, served by uvicorn on a thread of
its own. Every browser tab's generate request is a GenerateStream call of its own; when the tab goes, so does the
call, and the server stops the job at its next step."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from ..client import Connection
from ..metrics import MissingExtra
from . import GATEWAY_GRACE_S
from .payload import (
    PayloadError,
    completed_json,
    error_json,
    event_json,
    generate_request,
    http_status,
    model_json,
    parse_body,
    sse,
)

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.types import Receive, Scope, Send
except ImportError as error:
    raise MissingExtra("the HTTP gateway needs starlette and uvicorn: pip install 'diffuserve[gateway]'") from error

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
# A generate body's limit: the longest prompt and negative prompt the server takes (10,000 characters each, up to
# 12 bytes each when JSON-escaped) fit four times over; a larger body is refused before it is read.
MAX_BODY_BYTES = 1 << 20
# Events pass proxies at once (nginx buffers a response unless told not to) and are never cached.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# How often start() looks whether uvicorn listens yet: it takes a few milliseconds.
START_POLL_S = 0.01
# The trailing metadata of a RESOURCE_EXHAUSTED answer saying when to come back (gRPC's retry pushback).
PUSHBACK_KEY = "grpc-retry-pushback-ms"
_END = object()


@dataclass(frozen=True)
class GatewayConfig:
    # The gRPC server(s) and how to reach them (TLS, a token), as every diffuserve client does.
    connection: Connection
    host: str = "127.0.0.1"
    # The HTTP port; 0: any free one (GatewayServer.port says which).
    port: int = 8080
    # Seconds open streams get to finish when the gateway stops.
    grace_s: float = GATEWAY_GRACE_S
    # A deadline for each call to the server; None: none.
    timeout_s: float | None = None


class ServerStream:
    """One GenerateStream call, read on a thread of its own (gRPC's blocking iterator, so the event loop never waits
    on it), its events handed to the loop in order. cancel() ends the call wherever it is."""

    def __init__(
        self,
        stub: pb_grpc.DiffusionServiceStub,
        request: pb.GenerateRequest,
        metadata: Sequence[tuple[str, str]],
        timeout_s: float | None,
    ):
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._call = stub.GenerateStream(request, metadata=metadata, timeout=timeout_s)
        threading.Thread(target=self._read, name="gateway-stream", daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self._call:
                self._hand_over(event)
        except grpc.RpcError as error:
            self._hand_over(error)
        else:
            self._hand_over(_END)

    def _hand_over(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the gateway's loop has closed: nobody is left to read the call
            self._call.cancel()

    async def next(self) -> pb.GenerateEvent | None:
        """The next event; None when the stream has ended; the call's RpcError when it failed."""
        item = await self._events.get()
        if isinstance(item, grpc.RpcError):
            raise item
        return None if item is _END else item

    def cancel(self) -> None:
        self._call.cancel()


class EventStreamResponse(StreamingResponse):
    """A stream's events as server-sent events. However the response ends (read to the end, the tab closed, the
    gateway stopped), the gRPC call ends with it, so the server never works on for nobody."""

    def __init__(self, stream: ServerStream, first: pb.GenerateEvent | None, request: pb.GenerateRequest):
        super().__init__(event_lines(stream, first, request), media_type="text/event-stream", headers=SSE_HEADERS)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.cancel()


async def event_lines(
    stream: ServerStream, event: pb.GenerateEvent | None, request: pb.GenerateRequest
) -> AsyncIterator[bytes]:
    images: list[pb.Image] = []
    try:
        while event is not None:
            if event.HasField("completed"):
                yield sse("completed", completed_json(request, event.completed, images))
            else:
                name, data = event_json(event)
                if name == "image":
                    images.append(event.image)
                yield sse(name, data)
            event = await stream.next()
    except grpc.RpcError as error:  # after the stream began, a failure is its last event
        yield sse("error", error_json(error.code(), error.details() or "")["error"])


def call_metadata(request: Request, link: Connection) -> tuple[tuple[str, str], ...]:
    """The caller's own Authorization header when it sends one (the gateway grants no access of its own), else the
    gateway's token, if it was given one."""
    header = request.headers.get("authorization")
    if header is None:
        return link.metadata
    if not (header.isascii() and header.isprintable()):
        raise PayloadError("Authorization", "the header must be printable ASCII, e.g. 'Bearer TOKEN'")
    return (("authorization", header),)


def payload_error(error: PayloadError) -> JSONResponse:
    """The gateway's own refusal, shaped as the server's are (error_json)."""
    body = {"code": "INVALID_ARGUMENT", "status": error.status, "message": str(error), "fields": [error.field]}
    return JSONResponse({"error": body}, status_code=error.status)


def rpc_error(error: grpc.RpcError) -> JSONResponse:
    """The server's status as HTTP, its message kept; a pushback becomes Retry-After."""
    code = error.code()
    headers = {}
    for key, value in error.trailing_metadata() or ():
        if key == PUSHBACK_KEY and str(value).isdigit():
            headers["Retry-After"] = str(-(-int(value) // 1000))  # whole seconds, rounded up
    return JSONResponse(error_json(code, error.details() or ""), status_code=http_status(code), headers=headers)


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = PayloadError("body", f"at most {MAX_BODY_BYTES} bytes", status=413)
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def page(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def list_models(request: Request) -> JSONResponse:
    state = request.app.state
    try:
        metadata = call_metadata(request, state.config.connection)
        response = await asyncio.to_thread(
            state.stub.ListModels, pb.ListModelsRequest(), timeout=state.config.timeout_s, metadata=metadata
        )
    except PayloadError as error:
        return payload_error(error)
    except grpc.RpcError as error:
        return rpc_error(error)
    return JSONResponse({"models": [model_json(model) for model in response.models]})


async def generate(request: Request):
    """POST /api/generate: a JSON body of GenerateRequest fields -> server-sent events queued, progress (with latent
    previews when preview_interval asks), image, completed; or error. A request the server refuses before it starts
    is an HTTP error status with the server's message instead."""
    state = request.app.state
    try:
        proto = generate_request(parse_body(await read_body(request)))
        metadata = call_metadata(request, state.config.connection)
    except PayloadError as error:
        return payload_error(error)
    stream = ServerStream(state.stub, proto, metadata, state.config.timeout_s)
    try:
        first = await stream.next()  # the first answer decides the status: queued, or refused
    except grpc.RpcError as error:
        return rpc_error(error)
    except BaseException:  # the caller left while it waited: no response will ever end the call
        stream.cancel()
        raise
    return EventStreamResponse(stream, first, proto)


def create_app(config: GatewayConfig) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        channel = config.connection.channel()
        app.state.stub = pb_grpc.DiffusionServiceStub(channel)
        try:
            yield
        finally:
            channel.close()

    routes = [
        Route("/", page),
        Route("/api/models", list_models),
        Route("/api/generate", generate, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.config = config
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port. gRPC's spelling of the IPv6 wildcard ("[::]") listens on IPv4 too, as gRPC's
    port does; on a host without IPv6, on IPv4 alone."""
    address = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        if address != "::":
            raise
        return listening_socket("0.0.0.0", port)
    # A restarted gateway rebinds its port while the last run's connections linger in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if address == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((address, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


class GatewayServer:
    """The gateway under uvicorn on a thread (and an event loop) of its own: start() listens, stop() gives open
    streams up to grace_s to finish, then ends them (and so their calls)."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}/"

    def start(self) -> GatewayServer:
        sock = listening_socket(self.config.host, self.config.port)
        self.port = sock.getsockname()[1]
        settings = uvicorn.Config(
            create_app(self.config),
            lifespan="on",
            # diffuserve's logging stays as configured; the gRPC server logs every request already.
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=self.config.grace_s,
        )
        self._server = uvicorn.Server(settings)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="http-gateway", daemon=True
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                sock.close()
                raise RuntimeError(f"the HTTP gateway on {self.url} did not start (its log says why)")
            time.sleep(START_POLL_S)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def loopback_address(host: str, port: int) -> str:
    """Where a process reaches its own gRPC port: the IPv4 loopback when it listens on every interface, else the
    address it listens on."""
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        return f"127.0.0.1:{port}"
    return f"{host}:{port}"


def gateway_beside_server(host: str, grpc_port: int, http_port: int, grace_s: float) -> GatewayServer:
    """`serve --http-port`'s gateway: on the server's host, reaching its gRPC port over loopback in plaintext (a TLS
    port is refused at start-up), with no token of its own (callers bring theirs)."""
    link = Connection((loopback_address(host, grpc_port),))
    return GatewayServer(GatewayConfig(link, host, http_port, grace_s))


def run_gateway(config: GatewayConfig) -> None:
    """Serves until SIGTERM or SIGINT, then gives open streams up to config.grace_s and returns."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    gateway = GatewayServer(config).start()
    log.info("playground on %s, for the gRPC server %s", gateway.url, config.connection.target)
    stop.wait()
    log.info("stopping: open streams get up to %.0f s", config.grace_s)
    gateway.stop()
    log.info("stopped")
