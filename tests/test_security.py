"""TLS, mutual TLS and bearer tokens on real loopback servers, with certificates made here; the client's round-robin
over two replicas, and one replica draining while the other carries the load."""

from __future__ import annotations

import datetime
import ipaddress
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from diffuserve.server.app import BackgroundServer, ServerConfig
from diffuserve.server.cli import main
from diffuserve.server.client import Connection, connection, request_generate
from diffuserve.server.models import ServedModel
from diffuserve.server.security import SecurityError, TlsFiles, load_tokens, token_matches
from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from .serving_helpers import euler_request, free_port

TOKEN = "s3cret-token-0123456789abcdef"


def write_pem(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def certificate(name: str, key, issuer_name: str, issuer_key, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA; and a stranger's."""
    folder = tmp_path_factory.mktemp("pki")
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "server", "client", "stranger")}
    ca = certificate("diffuserve test CA", keys["ca"], "diffuserve test CA", keys["ca"], ca=True)
    certs = {
        "ca": ca,
        "server": certificate("127.0.0.1", keys["server"], "diffuserve test CA", keys["ca"], server=True),
        "client": certificate("a client", keys["client"], "diffuserve test CA", keys["ca"]),
        "stranger": certificate("a stranger", keys["stranger"], "a stranger", keys["stranger"]),
    }
    files = {}
    for name, cert in certs.items():
        files[f"{name}_cert"] = write_pem(folder / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
        key = keys[name].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        files[f"{name}_key"] = write_pem(folder / f"{name}.key", key)
    return files


def running(model: ServedModel, **settings) -> BackgroundServer:
    config = ServerConfig(model_dirs=(), host="127.0.0.1", port=0, **settings)
    return BackgroundServer(config, {model.name: model})


def generate(link: Connection) -> pb.GenerateResponse:
    return request_generate(link, euler_request(prompt="a red circle", steps=2, seeds=[1]), timeout_s=60)


def test_tls_serves_a_client_trusting_the_ca_and_no_plaintext_client(tiny_model, pki):
    with running(tiny_model, tls=TlsFiles(pki["server_cert"], pki["server_key"])) as server:
        response = generate(Connection((server.address,), tls=True, tls_ca=pki["ca_cert"]))
        assert len(response.images) == 1
        with pytest.raises(grpc.RpcError) as plaintext:
            generate(Connection((server.address,)))
        with pytest.raises(grpc.RpcError) as untrusted:
            generate(Connection((server.address,), tls=True, tls_ca=pki["stranger_cert"]))
    assert plaintext.value.code() == untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate_the_ca_signed(tiny_model, pki):
    tls = TlsFiles(pki["server_cert"], pki["server_key"], client_ca=pki["ca_cert"])
    with running(tiny_model, tls=tls) as server:
        signed = Connection((server.address,), True, pki["ca_cert"], pki["client_cert"], pki["client_key"])
        assert generate(signed).images
        for refused in (
            Connection((server.address,), tls=True, tls_ca=pki["ca_cert"]),
            Connection((server.address,), True, pki["ca_cert"], pki["stranger_cert"], pki["stranger_key"]),
        ):
            with pytest.raises(grpc.RpcError) as error:
                generate(refused)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tokens_are_required_health_stays_open_and_reflection_closes_behind_a_flag(tiny_model):
    with running(tiny_model, auth_tokens=(TOKEN, "another-token-0123456789"), open_reflection=False) as server:
        for token in (None, "wrong-token-0123456789abcd", TOKEN[:-1]):
            with pytest.raises(grpc.RpcError) as refused:
                generate(Connection((server.address,), token=token))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: send `authorization: Bearer <token>`" in refused.value.details()
        assert generate(Connection((server.address,), token=TOKEN)).images
        assert generate(Connection((server.address,), token="another-token-0123456789")).images
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stream = pb_grpc.DiffusionServiceStub(channel).GenerateStream(euler_request(prompt="a", steps=2))
            with pytest.raises(grpc.RpcError) as refused_stream:
                list(stream)
            assert refused_stream.value.code() == grpc.StatusCode.UNAUTHENTICATED
            listing = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as closed:
                list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([listing])))
            assert closed.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tokens_come_from_files_and_the_environment_never_short_ones(tmp_path: Path):
    path = tmp_path / "tokens"
    path.write_text(f"# rotated monthly\n{TOKEN}\n\nsecond-token-0123456789\n")
    assert load_tokens(str(path), {}) == (TOKEN, "second-token-0123456789")
    environment = {"DIFFUSERVE_AUTH_TOKENS": "env-token-a-0123456789, env-token-b-0123456789"}
    assert load_tokens(None, environment) == ("env-token-a-0123456789", "env-token-b-0123456789")
    assert load_tokens(None, {}) == ()
    with pytest.raises(SecurityError, match="at least 16 printable characters"):
        load_tokens(None, {"DIFFUSERVE_AUTH_TOKEN": "short"})
    with pytest.raises(SecurityError, match="--auth-token-file: cannot read"):
        load_tokens(str(tmp_path / "missing"), {})
    tokens = (TOKEN.encode(), b"second-token-0123456789")
    assert token_matches(TOKEN, tokens) and not token_matches(TOKEN + "x", tokens) and not token_matches("", tokens)


def test_the_cli_client_speaks_tls_with_a_token_from_the_environment(tiny_model, pki, tmp_path, monkeypatch, capsys):
    tls = TlsFiles(pki["server_cert"], pki["server_key"])
    with running(tiny_model, tls=tls, auth_tokens=(TOKEN,)) as server:
        args = ["generate", "a red circle", "--server", server.address, "-o", str(tmp_path / "out.png")]
        args += ["--steps", "2", "--tls-ca", pki["ca_cert"]]
        assert main(args) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        monkeypatch.setenv("DIFFUSERVE_AUTH_TOKEN", TOKEN)
        assert main(args) == 0
    assert (tmp_path / "out.png").is_file()


def test_round_robin_spreads_calls_over_replicas_and_a_draining_one_hands_over(tiny_model):
    """Two replicas behind one client: calls alternate; SIGTERM's drain on one (health NOT_SERVING, new calls
    UNAVAILABLE, accepted ones finish) loses nothing, the client retrying on the other."""
    first, second = running(tiny_model).start(), running(tiny_model).start()
    try:
        link = connection(f"{first.address},{second.address}")
        with link.channel() as channel:
            stub = pb_grpc.DiffusionServiceStub(channel)
            for _ in range(4):  # until both replicas are connected and healthy, picks go to those that are
                stub.ListModels(pb.ListModelsRequest(), wait_for_ready=True, timeout=30)
            for seed in range(8):
                stub.Generate(euler_request(prompt="a red circle", steps=2, seeds=[seed]), timeout=60)
            served = [first.running.worker.steps_run, second.running.worker.steps_run]
            assert sum(served) == 16 and min(served) >= 4  # each replica ran at least two of the 2-step requests

            with ThreadPoolExecutor(8) as pool, grpc.insecure_channel(first.address) as direct:
                long = euler_request(prompt="long", steps=60, seeds=[1])
                accepted = pool.submit(pb_grpc.DiffusionServiceStub(direct).Generate, long, timeout=120)
                time.sleep(0.3)
                drained = threading.Thread(target=first.stop, args=(60.0,))
                drained.start()
                time.sleep(0.2)
                health = health_pb2_grpc.HealthStub(direct).Check(health_pb2.HealthCheckRequest(service=""))
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
                later = [
                    pool.submit(stub.Generate, euler_request(prompt="a circle", steps=2, seeds=[s]), timeout=60)
                    for s in range(8)
                ]
                assert all(len(f.result().images) == 1 for f in later)
                assert len(accepted.result().images) == 1
                drained.join(timeout=120)
    finally:
        second.stop()


def test_bench_loads_running_servers_round_robin_with_a_token(tiny_model, monkeypatch, capsys):
    first = running(tiny_model, auth_tokens=(TOKEN,)).start()
    second = running(tiny_model, auth_tokens=(TOKEN,)).start()
    try:
        monkeypatch.setenv("DIFFUSERVE_AUTH_TOKEN", TOKEN)
        args = ["bench", "--load", "--server", f"{first.address},{second.address}", "--concurrency", "2"]
        assert main([*args, "--requests", "6", "--steps", "2"]) == 0
        assert first.running.worker.steps_run > 0 and second.running.worker.steps_run > 0
    finally:
        first.stop()
        second.stop()
    out = capsys.readouterr().out
    assert f"closed loop, server {first.address}, {second.address}: model" in out


def test_sigterm_on_one_of_two_serve_processes_loses_nothing(tiny_export: Path):
    """Two `diffuserve serve` processes behind one round-robin client; SIGTERM on one while it runs a request: that
    request completes, the process exits cleanly, and every call made meanwhile is served by the other."""
    ports = [free_port(), free_port()]
    command = [sys.executable, "-m", "diffuserve.server.cli", "serve", str(tiny_export), "--host", "127.0.0.1"]
    processes = [subprocess.Popen([*command, "--port", str(p), "--backend", "cpu", "--grace", "60"]) for p in ports]
    try:
        link = connection([f"127.0.0.1:{p}" for p in ports])
        with link.channel() as channel, grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as direct:
            grpc.channel_ready_future(channel).result(timeout=120)
            grpc.channel_ready_future(direct).result(timeout=120)
            stub = pb_grpc.DiffusionServiceStub(channel)
            stream = pb_grpc.DiffusionServiceStub(direct).GenerateStream(euler_request(prompt="long", steps=60))
            events = [next(stream)]
            while not events[-1].HasField("progress"):
                events.append(next(stream))
            processes[0].send_signal(signal.SIGTERM)
            with ThreadPoolExecutor(4) as pool:
                later = [
                    pool.submit(stub.Generate, euler_request(prompt="a circle", steps=2, seeds=[s]), timeout=60)
                    for s in range(8)
                ]
                responses = [f.result() for f in later]
            events.extend(stream)
        assert processes[0].wait(timeout=90) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert all(len(r.images) == 1 for r in responses)
    assert events[-1].HasField("completed") and sum(e.HasField("image") for e in events) == 1
