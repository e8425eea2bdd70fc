"""Server interceptors: what every RPC of every service on the port gets before and around its handler."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger(__name__)

# Enough of the parser's complaint to say what was wrong, without echoing what the client sent.
MAX_PARSE_ERROR_CHARS = 200


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that are not the method's message; handed to the handler in the message's place."""

    error: str


class RequestGuard(grpc.aio.ServerInterceptor):
    """Undecodable request bytes answer INVALID_ARGUMENT (gRPC would answer UNKNOWN), and an exception a handler
    did not expect answers INTERNAL with a message free of Python internals; the details go to the log.

    Applies to methods with a single request message (every unary and server-streaming method)."""

    def __init__(self) -> None:
        # method -> (the handler as registered, its guarded form): built once per method, not per call.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        known = self._guarded.get(details.method)
        if known is None or known[0] is not handler:
            known = self._guarded[details.method] = (handler, guard(handler, details.method))
        return known[1]


def tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data) if parse is not None else data
        except Exception as e:  # protobuf's DecodeError, or anything a parser raises on bad bytes
            return Undecodable(str(e)[:MAX_PARSE_ERROR_CHARS])

    return deserialize


async def refuse_undecodable(request: Any, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(request, Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request: the bytes sent are not a valid request message for {method} ({request.error})",
        )


async def internal_error(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    log.error("%s: unexpected error", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"{method} failed on the server; its log has the details")


async def relay(responses: Any, context: grpc.aio.ServicerContext) -> None:
    """A streaming handler's responses onto the call: it yields them, or writes them to the context itself."""
    if not inspect.isasyncgen(responses):
        await responses
        return
    try:
        async for response in responses:
            await context.write(response)
    finally:  # runs the handler's own clean-up now, however the call ends
        await responses.aclose()


def guard(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    deserialize = tolerant(handler.request_deserializer)
    if handler.response_streaming:
        inner = handler.unary_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> None:
            await refuse_undecodable(request, context, method)
            try:
                await relay(inner(request, context), context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as e:
                await internal_error(context, method, e)

        return grpc.unary_stream_rpc_method_handler(streaming, deserialize, handler.response_serializer)

    inner = handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse_undecodable(request, context, method)
        try:
            return await inner(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await internal_error(context, method, e)

    return grpc.unary_unary_rpc_method_handler(unary, deserialize, handler.response_serializer)
