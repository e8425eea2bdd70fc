"""Runs inside Ray Serve's gRPC proxy: a server stream whose client goes away cancels the call to the replica.

Ray 2.60's proxy cancels a call whose client went away only when the news finds it awaiting the replica's next
message. When it finds it handing a message to gRPC (the proxy's stream is closed at its `yield`), the proxy stops
reading but never cancels the call: the router's stream, the model replica's stream and the worker's job all run on
to their end. diffuserve streams an event per denoising step, so that is most cancellations.

Listed in gRPCOptions.grpc_servicer_functions (Ray calls each entry in the proxy process as `fn(servicer, server)`),
it registers no service: it wraps the proxy's `send_request_to_replica` so that a stream closed before its end
cancels the replica calls it made. Ray's own path is unchanged otherwise. Kept apart from diffuserve_ray so the
proxy imports nothing but Ray.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)

FUNCTION = "diffuserve_ray_proxy.cancel_streams_on_disconnect"
_MARK = "_diffuserve_cancels_on_close"


class RecordingHandle:
    """A DeploymentHandle that remembers the calls made through it."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.responses: list[Any] = []

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        response = self._handle.remote(*args, **kwargs)
        self.responses.append(response)
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def cancel_streams_on_disconnect(servicer: Any = None, server: Any = None) -> bool:
    """Wraps gRPCProxy.send_request_to_replica once per process; False (with a warning) where Ray's proxy is not
    the one this was written against, which is then left as it is."""
    try:
        from ray.serve._private.proxy import gRPCProxy
    except ImportError:
        log.warning("Ray Serve's gRPC proxy was not found; stream cancellation is left as Ray has it")
        return False
    original = getattr(gRPCProxy, "send_request_to_replica", None)
    if getattr(original, _MARK, False):
        return True
    if not inspect.isasyncgenfunction(original) or "handle" not in inspect.signature(original).parameters:
        log.warning("Ray Serve's gRPC proxy has changed; stream cancellation is left as Ray has it")
        return False

    async def send_request_to_replica(self: Any, *args: Any, **kwargs: Any):
        if "handle" not in kwargs:  # Ray calls it with keywords; anything else is passed through untouched
            async for message in original(self, *args, **kwargs):
                yield message
            return
        calls = kwargs["handle"] = RecordingHandle(kwargs["handle"])
        finished = False
        try:
            async for message in original(self, *args, **kwargs):
                yield message
            finished = True
        finally:
            if not finished:  # closed before its end: the client went away
                for response in calls.responses:
                    if not response.cancelled():
                        response.cancel()

    setattr(send_request_to_replica, _MARK, True)
    gRPCProxy.send_request_to_replica = send_request_to_replica
    return True
