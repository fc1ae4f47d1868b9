"""TLS and mutual TLS on the shared gRPC bootstrap and between the services,
with certificates made per run.

A client that trusts our CA reaches a TLS server; with a client CA configured
the server refuses a client that presents no certificate (mTLS); health stays
reachable for probes over the same credentials.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.contracts import gen, gen_grpc
from services.grpc_server import RunningServer, open_channel, start_server
from services.settings import TlsSettings
from tests.fixtures.generation import StartGeneration
from tests.fixtures.simulator import StartSimulator
from tests.fixtures.worker import StartWorker

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(folder: Path, name: str, ca: str = "ca") -> None:
    """A key and a certificate for `name` (valid for localhost), signed by the CA."""
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-subj",
        f"/CN={name}",
        "-out",
        f"{name}.csr",
        cwd=folder,
    )
    (folder / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=folder,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-subj",
        "/CN=lockn-test-ca",
        "-days",
        "1",
        "-out",
        "ca.pem",
        cwd=folder,
    )
    issue(folder, "server")
    issue(folder, "client")
    return folder


async def check(address: str, tls: TlsSettings) -> int:
    async with open_channel(address, tls=tls) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return int(reply.status)


@pytest.fixture
async def tls_server(pki: Path) -> AsyncIterator[RunningServer]:
    tls = TlsSettings(cert_file=pki / "server.pem", key_file=pki / "server.key")
    running = await start_server("localhost:0", [], tls=tls)
    yield running
    await running.stop(0)


@pytest.fixture
async def mtls_server(pki: Path) -> AsyncIterator[RunningServer]:
    tls = TlsSettings(
        cert_file=pki / "server.pem", key_file=pki / "server.key", client_ca_file=pki / "ca.pem"
    )
    running = await start_server("localhost:0", [], tls=tls)
    yield running
    await running.stop(0)


async def test_a_client_trusting_our_ca_reaches_a_tls_server(
    tls_server: RunningServer, pki: Path
) -> None:
    client = TlsSettings(ca_file=pki / "ca.pem")
    assert (
        await check(f"localhost:{tls_server.port}", client)
        == health_pb2.HealthCheckResponse.SERVING
    )


async def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await check(f"localhost:{tls_server.port}", TlsSettings())
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_admits_a_client_with_a_certificate_from_our_ca(
    mtls_server: RunningServer, pki: Path
) -> None:
    client = TlsSettings(
        ca_file=pki / "ca.pem", cert_file=pki / "client.pem", key_file=pki / "client.key"
    )
    assert await check(f"localhost:{mtls_server.port}", client) == (
        health_pb2.HealthCheckResponse.SERVING
    )


async def test_mtls_refuses_a_client_without_a_certificate(
    mtls_server: RunningServer, pki: Path
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await check(f"localhost:{mtls_server.port}", TlsSettings(ca_file=pki / "ca.pem"))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_generation_runs_with_mutual_tls_between_every_part(
    pki: Path,
    simulator_factory: StartSimulator,
    worker_factory: StartWorker,
    generation_factory: StartGeneration,
) -> None:
    # One block serves both ways: the service's certificate is also its client
    # certificate when it dials a peer that requires one.
    tls = {
        "cert_file": str(pki / "server.pem"),
        "key_file": str(pki / "server.key"),
        "client_ca_file": str(pki / "ca.pem"),
        "ca_file": str(pki / "ca.pem"),
    }
    simulator = await simulator_factory()
    worker = await worker_factory(simulator, tls=tls)
    service = await generation_factory(workers=[worker], tls=tls)
    caller = TlsSettings(
        ca_file=pki / "ca.pem", cert_file=pki / "client.pem", key_file=pki / "client.key"
    )
    async with open_channel(f"127.0.0.1:{service.running.port}", tls=caller) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        request = gen.CreateGenerationRequest(
            template="sd15-txt2img",
            parameters={"prompt": gen.ParameterValue(string_value="over mTLS")},
        )
        created = (await stub.CreateGeneration(request, timeout=10)).generation
        async with asyncio.timeout(30):
            while True:
                reply = await stub.GetGeneration(gen.GetGenerationRequest(id=created.id))
                if reply.generation.status == gen.GENERATION_STATUS_COMPLETED:
                    break
                assert reply.generation.status != gen.GENERATION_STATUS_FAILED, reply
                await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError):  # and a plaintext caller gets nowhere
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.running.port}") as plain:
            await gen_grpc.GenerationServiceStub(plain).GetStats(gen.GetStatsRequest(), timeout=3)
