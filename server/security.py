"""TLS, mutual TLS and bearer tokens on the gRPC port; the channel options that make clients re-balance.

Secrets come from files or the environment, never from argv alone (argv is readable by every user of the machine).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_ENV = "DIFFUSERVE_AUTH_TOKEN"
# Several tokens in one variable, comma-separated (a rotation keeps the old one valid for a while).
TOKENS_ENV = "DIFFUSERVE_AUTH_TOKENS"
AUTHORIZATION = "authorization"
BEARER = "bearer "
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
# Shorter tokens are guessable; a random 32-byte token is 43 characters of base64.
MIN_TOKEN_CHARS = 16


class SecurityError(ValueError):
    """A TLS or token setting that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate chain and key (PEM), and for mutual TLS the CA its clients' certificates chain to."""

    cert: str
    key: str
    client_ca: str | None = None


def read_pem(path: str, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SecurityError(f"{setting}: cannot read {path}: {error.strerror}") from None
    if b"-----BEGIN" not in data:
        raise SecurityError(f"{setting}: {path} is not a PEM file")
    return data


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with a client CA, every client must present a certificate it signed."""
    pair = (read_pem(tls.key, "--tls-key"), read_pem(tls.cert, "--tls-cert"))
    if tls.client_ca is None:
        return grpc.ssl_server_credentials([pair])
    ca = read_pem(tls.client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=True)


def channel_credentials(ca: str | None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """A client's TLS: the CA to trust (None: the system's), and its own certificate and key for mutual TLS."""
    if (cert is None) != (key is None):
        raise SecurityError("--tls-cert and --tls-key: give both for mutual TLS, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "--tls-ca") if ca else None,
        private_key=read_pem(key, "--tls-key") if key else None,
        certificate_chain=read_pem(cert, "--tls-cert") if cert else None,
    )


def load_tokens(token_file: str | None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The tokens the server accepts: one per line of the file (# comments and blank lines skipped), and those in
    DIFFUSERVE_AUTH_TOKEN / DIFFUSERVE_AUTH_TOKENS. None at all: the port is open."""
    environ = os.environ if environ is None else environ
    tokens: list[str] = []
    if token_file:
        try:
            lines = Path(token_file).read_text().splitlines()
        except OSError as error:
            raise SecurityError(f"--auth-token-file: cannot read {token_file}: {error.strerror}") from None
        tokens += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not tokens:
            raise SecurityError(f"--auth-token-file: {token_file} holds no token")
    tokens += [t.strip() for t in environ.get(TOKENS_ENV, "").split(",") if t.strip()]
    if environ.get(TOKEN_ENV, "").strip():
        tokens.append(environ[TOKEN_ENV].strip())
    for token in tokens:
        if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
            raise SecurityError(
                f"auth tokens must be at least {MIN_TOKEN_CHARS} printable characters without spaces; one has "
                f"{len(token)}"
            )
    return tuple(dict.fromkeys(tokens))


def client_token(token_file: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The token a client sends: the file's first token, else DIFFUSERVE_AUTH_TOKEN."""
    environ = os.environ if environ is None else environ
    if token_file:
        tokens = load_tokens(token_file, {})
        return tokens[0]
    return environ.get(TOKEN_ENV, "").strip() or None


def token_matches(presented: str, tokens: Sequence[bytes]) -> bool:
    """Compared with every accepted token in constant time, whichever matches: the time says nothing of which."""
    given = presented.encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token)
    return matched


class TokenAuth(grpc.aio.ServerInterceptor):
    """Calls without `authorization: Bearer <token>` of an accepted token answer UNAUTHENTICATED before any handler
    runs. Health checks stay open (probes carry no token) unless told otherwise; reflection is open unless closed."""

    def __init__(self, tokens: Iterable[str], open_health: bool = True, open_reflection: bool = True):
        self.tokens = tuple(token.encode() for token in tokens)
        self.open_prefixes = (
            *((HEALTH_PREFIX,) if open_health else ()),
            *(REFLECTION_PREFIXES if open_reflection else ()),
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method.startswith(self.open_prefixes) or self.authorized(details.invocation_metadata or ()):
            return handler
        return refusal(handler)

    def authorized(self, metadata: Iterable[tuple[str, str | bytes]]) -> bool:
        for key, value in metadata:
            if key == AUTHORIZATION and isinstance(value, str) and value[: len(BEARER)].lower() == BEARER:
                return token_matches(value[len(BEARER) :].strip(), self.tokens)
        return False


def refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """A handler of the method's own kind that answers UNAUTHENTICATED without reading the request."""
    if handler is None:
        return None
    message = "authorization: send `authorization: Bearer <token>` metadata with a token this server accepts"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - never reached: abort raises

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    body = streaming if handler.response_streaming else unary
    # The raw bytes are never parsed: a refused caller's message costs nothing to decode.
    return make(body, request_deserializer=None, response_serializer=handler.response_serializer)


def keepalive_options(longest_request_s: float) -> list[tuple[str, int]]:
    """Server channel options, each for a reason."""
    return [
        # Pings an idle client every 30 s, so a connection a NAT or load balancer dropped is noticed and closed.
        ("grpc.keepalive_time_ms", 30_000),
        # A ping unanswered for 10 s means the client is gone.
        ("grpc.keepalive_timeout_ms", 10_000),
        # Clients may ping every 10 s without data (gRPC's default refuses pings more often than every 5 minutes
        # and answers GOAWAY "too_many_pings", which looks like a crash to a client with keepalive on).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC keeps one HTTP/2 connection per client: after 5 minutes the server asks the client to reconnect, so
        # a client balancing over DNS or behind an L4 balancer spreads over replicas added since.
        ("grpc.max_connection_age_ms", 300_000),
        # ... and lets the calls in flight on the old connection finish: longer than the longest request.
        ("grpc.max_connection_age_grace_ms", int(longest_request_s * 1000)),
    ]
