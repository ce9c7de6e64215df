"""TLS, mutual TLS and bearer tokens on the real front server (certificates made here)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api.voicegate.v1 import audio_pb2, speaker_pb2, speaker_pb2_grpc
from server.config import Settings
from server.errors import ConfigError
from server.security import TokenAuthInterceptor, hash_token, parse_token_lines

FULL_TOKEN = "vg-full-3f9c1e7a5b2d"
EMBED_ONLY_TOKEN = "vg-embed-only-8d4a6c0e"
WRONG_TOKEN = "vg-wrong-000000000000"
SPEAKER_SERVICE = "voicegate.v1.SpeakerService"
# Empty audio: refused with INVALID_ARGUMENT by the handler, so a call that gets it was let
# through by the token check, without any Triton work.
BAD_EMBED = speaker_pb2.EmbedRequest(audio=audio_pb2.Audio(content=b""))

pytestmark = pytest.mark.integration


# --- certificates ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("voicegate test CA", ca_key, _name("voicegate test CA"), ca_key, ca=True)
    ca_path, _ = _write(folder, "ca", ca_cert, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue("localhost", server_key, ca_cert.subject, ca_key, server=True)
    server_cert_path, server_key_path = _write(folder, "server", server_cert, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue("test client", client_key, ca_cert.subject, ca_key)
    client_cert_path, client_key_path = _write(folder, "client", client_cert, client_key)
    return Pki(ca_path, server_cert_path, server_key_path, client_cert_path, client_key_path)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(
        "# voicegate bearer tokens, hashed\n"
        f"{hash_token(FULL_TOKEN)}  # every method\n"
        f"{hash_token(EMBED_ONLY_TOKEN)} Embed,GetSpeaker\n"
    )
    return path


# --- servers ---------------------------------------------------------------------------


def _server_settings(base_settings: Settings, triton: object, **changes: object) -> Settings:
    return base_settings.replace(
        triton_url=triton.grpc_url,  # type: ignore[attr-defined]
        **changes,
    )


@pytest_asyncio.fixture(scope="module")
async def tls_app(
    base_settings: Settings, triton: object, pki: Pki, tokens_file: Path
) -> AsyncIterator[object]:
    """TLS (no client certificates) and bearer tokens."""
    from server.app import VoicegateApp

    settings = _server_settings(
        base_settings,
        triton,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        auth_tokens_file=tokens_file,
    )
    async with VoicegateApp(settings) as app:
        yield app


@pytest_asyncio.fixture(scope="module")
async def mtls_app(base_settings: Settings, triton: object, pki: Pki) -> AsyncIterator[object]:
    """Mutual TLS, no tokens."""
    from server.app import VoicegateApp

    settings = _server_settings(
        base_settings,
        triton,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca,
    )
    async with VoicegateApp(settings) as app:
        yield app


def _tls_channel(pki: Pki, port: int, client_cert: bool = False) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if client_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if client_cert else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# --- TLS and mutual TLS ----------------------------------------------------------------


async def test_tls_call_works_with_the_ca(tls_app: object, pki: Pki) -> None:
    async with _tls_channel(pki, tls_app.port) as channel:  # type: ignore[attr-defined]
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        code = await _code(stub.Embed(BAD_EMBED, metadata=_bearer(FULL_TOKEN), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # reached the handler over TLS


async def test_plaintext_client_fails_against_tls(tls_app: object) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_app.port}") as channel:  # type: ignore[attr-defined]
        health = health_pb2_grpc.HealthStub(channel)
        code = await _code(health.Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE


async def test_mtls_without_client_certificate_fails(mtls_app: object, pki: Pki) -> None:
    async with _tls_channel(pki, mtls_app.port) as channel:  # type: ignore[attr-defined]
        health = health_pb2_grpc.HealthStub(channel)
        code = await _code(health.Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE


async def test_mtls_with_client_certificate_works(mtls_app: object, pki: Pki) -> None:
    async with _tls_channel(pki, mtls_app.port, client_cert=True) as channel:  # type: ignore[attr-defined]
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        assert await _code(stub.Embed(BAD_EMBED, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT


async def test_cli_client_speaks_tls_and_sends_the_token(
    tls_app: object, mtls_app: object, pki: Pki, tmp_path: Path
) -> None:
    import asyncio

    from server.cli import main
    from server.client import Connection, embed_file

    tls = f"127.0.0.1:{tls_app.port}"  # type: ignore[attr-defined]
    mtls = f"127.0.0.1:{mtls_app.port}"  # type: ignore[attr-defined]
    assert await asyncio.to_thread(main, ["health", "--server", tls, "--tls-ca", str(pki.ca)]) == 0
    client_cert = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    health = ["health", "--server", mtls, "--tls-ca", str(pki.ca)]
    assert await asyncio.to_thread(main, [*health, *client_cert]) == 0
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    for token, expected in ((None, "UNAUTHENTICATED"), (FULL_TOKEN, "INVALID_ARGUMENT")):
        connection = Connection(tls, tls_ca=pki.ca, token=token)
        with pytest.raises(grpc.RpcError) as caught:
            await asyncio.to_thread(embed_file, connection, empty)
        assert caught.value.code().name == expected  # type: ignore[attr-defined]


# --- bearer tokens ---------------------------------------------------------------------


async def test_tokens_authenticate_and_authorize(
    tls_app: object, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    metrics = tls_app.metrics  # type: ignore[attr-defined]

    def handled(method: str, code: str) -> float:
        labels = {"grpc_service": SPEAKER_SERVICE, "grpc_method": method, "grpc_code": code}
        value = metrics.registry.get_sample_value("voicegate_grpc_server_handled_total", labels)
        return float(value or 0.0)

    unauthenticated_before = handled("Embed", "UNAUTHENTICATED")
    denied_before = handled("Verify", "PERMISSION_DENIED")
    async with _tls_channel(pki, tls_app.port) as channel:  # type: ignore[attr-defined]
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Embed(BAD_EMBED, timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert missing.value.details() == "missing bearer token"

        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await stub.Embed(BAD_EMBED, metadata=_bearer(WRONG_TOKEN), timeout=10)
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert wrong.value.details() == "invalid bearer token"

        for token in (FULL_TOKEN, EMBED_ONLY_TOKEN):
            code = await _code(stub.Embed(BAD_EMBED, metadata=_bearer(token), timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT  # authenticated: the handler ran

        verify = speaker_pb2.VerifyRequest()
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.Verify(verify, metadata=_bearer(EMBED_ONLY_TOKEN), timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert EMBED_ONLY_TOKEN not in denied.value.details()
        code = await _code(stub.Verify(verify, metadata=_bearer(FULL_TOKEN), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT

        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    # the telemetry interceptor (outermost) counted the refusals with their status codes
    assert handled("Embed", "UNAUTHENTICATED") == unauthenticated_before + 2
    assert handled("Verify", "PERMISSION_DENIED") == denied_before + 1
    assert "UNAUTHENTICATED" in caplog.text  # the refusals were logged ...
    for token in (FULL_TOKEN, EMBED_ONLY_TOKEN, WRONG_TOKEN):
        assert token not in caplog.text  # ... without any token


# --- units: token file, settings --------------------------------------------------------


def test_token_file_lines_are_parsed_and_validated() -> None:
    digest = hash_token("t")
    upper = "sha256:" + digest.removeprefix("sha256:").upper()
    entries = parse_token_lines(["# comment", "", digest, f"{upper} *", f"{digest} Embed, Verify"])
    assert [e.methods for e in entries] == [None, None, frozenset({"Embed", "Verify"})]
    with pytest.raises(ConfigError, match="sha256"):
        parse_token_lines(["plaintext-token"])
    with pytest.raises(ConfigError, match="64 hexadecimal"):
        parse_token_lines(["sha256:abcd"])
    with pytest.raises(ConfigError, match="unknown methods"):
        parse_token_lines([f"{digest} Embedd"])
    with pytest.raises(ConfigError, match="no tokens"):
        parse_token_lines(["# nothing"])


def test_check_refuses_without_echoing_the_token() -> None:
    from server.errors import PermissionDenied, Unauthenticated

    auth = TokenAuthInterceptor(parse_token_lines([f"{hash_token('good')} Embed"]))
    method = f"/{SPEAKER_SERVICE}/Embed"
    auth.check(method, [("authorization", "Bearer good")])
    auth.check("/grpc.health.v1.Health/Check", [])
    with pytest.raises(Unauthenticated, match="missing bearer token"):
        auth.check(method, [("authorization", "Basic Z29vZA==")])
    with pytest.raises(Unauthenticated, match="invalid bearer token") as caught:
        auth.check(method, [("authorization", "Bearer secret-guess")])
    assert "secret-guess" not in caught.value.message
    with pytest.raises(PermissionDenied):
        auth.check(f"/{SPEAKER_SERVICE}/Verify", [("authorization", "Bearer good")])


def test_tls_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both or neither"):
        Settings.load({"tls_cert_file": tmp_path / "c.pem"}, environ={})
    with pytest.raises(ConfigError, match="needs TLS"):
        Settings.load({"tls_client_ca_file": tmp_path / "ca.pem"}, environ={})
    settings = Settings.load(
        environ={
            "VOICEGATE_TLS_CERT_FILE": str(tmp_path / "c.pem"),
            "VOICEGATE_TLS_KEY_FILE": str(tmp_path / "k.pem"),
        }
    )
    assert settings.tls and settings.tls_client_ca_file is None
    from server.security import server_credentials

    with pytest.raises(ConfigError, match="cannot read"):
        server_credentials(settings)  # the files are read at start-up; missing ones fail it
