"""The containers' HEALTHCHECK: asks the server's grpc.health.v1.Health service; exit 0 when it answers SERVING.

`python3 health_probe.py [--port N] [--service NAME] [--timeout S]`: the port defaults to $PORT (else 50051), the
service to "" (the whole server; a model's name asks for that model). Any other answer, a closed port or a timeout
exits 1, with the reason on stderr (Docker keeps the last lines in `docker inspect`'s health log). It needs only the
standard library and grpcio with its health stubs, which diffuserve installs.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORT = 50051
# Well under the HEALTHCHECK's own --timeout, so that the probe reports why rather than being killed.
DEFAULT_TIMEOUT_S = 3.0


def check(address: str, service: str, timeout_s: float) -> tuple[bool, str]:
    """(healthy, what was found) for one Health.Check call."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or DEFAULT_PORT))
    parser.add_argument("--service", default="", help='"" for the server, or a model name')
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    args = parser.parse_args(argv)
    address = f"{args.host}:{args.port}"
    healthy, found = check(address, args.service, args.timeout)
    if not healthy:
        sys.stderr.write(f"health check of {address} (service {args.service!r}) failed: {found}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
