"""Transport security and caller authentication for the front server.

TLS: `server_credentials` reads the certificate, key and (for mutual TLS) client CA named by
the settings, once at start-up; with a client CA, client certificates are required.

Authentication: `TokenAuthInterceptor` checks the `authorization: Bearer <token>` metadata of
every call against a token file that holds only sha256 digests. Each line is

    sha256:<64 hex digits> [Method,Method,...|*]    # comment

where the optional list names the methods (short names, e.g. `Embed,Verify`) the token may
call; no list, or `*`, allows every method. The gRPC health service and reflection need no
token. Tokens are never logged or echoed: a refused call says "missing bearer token",
"invalid bearer token" or which method the token lacks.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server.api.voicegate.v1 import speaker_pb2, vad_pb2
from server.config import Settings
from server.errors import ConfigError, PermissionDenied, Unauthenticated, VoicegateError
from server.grpc_errors import abort_with, method_info, rewrap_handler

log = logging.getLogger(__name__)

DIGEST_PREFIX = "sha256:"
ALL_METHODS = "*"
API_METHODS = frozenset(
    method.name
    for api in (speaker_pb2, vad_pb2)
    for service in api.DESCRIPTOR.services_by_name.values()
    for method in service.methods
)


def hash_token(token: str) -> str:
    """The form a token is stored in: `sha256:<hex digest>` of its UTF-8 bytes."""
    return DIGEST_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"setting {setting}: cannot read {path}: {exc.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' files; None when TLS is off.

    With `tls_client_ca_file`, clients must present a certificate signed by that CA (mTLS).
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    cert = _read(settings.tls_cert_file, "tls_cert_file")
    key = _read(settings.tls_key_file, "tls_key_file")
    client_ca = (
        _read(settings.tls_client_ca_file, "tls_client_ca_file")
        if settings.tls_client_ca_file is not None
        else None
    )
    credentials: grpc.ServerCredentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    return credentials


@dataclass(frozen=True)
class TokenEntry:
    """One accepted token: its sha256 digest and the methods it may call (None: all)."""

    digest: bytes
    methods: frozenset[str] | None

    def allows(self, method: str) -> bool:
        return self.methods is None or method in self.methods


def parse_token_lines(lines: Iterable[str], source: str = "auth_tokens_file") -> list[TokenEntry]:
    """Token entries from the lines of a token file (see the module docstring)."""
    entries: list[TokenEntry] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        digest_text, _, rest = line.partition(" ")
        if not digest_text.startswith(DIGEST_PREFIX):
            raise ConfigError(f"{where}: expected sha256:<hex digest> (tokens are stored hashed)")
        hex_digest = digest_text[len(DIGEST_PREFIX) :].lower()
        try:
            digest = bytes.fromhex(hex_digest)
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise ConfigError(f"{where}: the digest must be 64 hexadecimal digits")
        names = {name.strip() for name in rest.replace(" ", ",").split(",") if name.strip()}
        methods: frozenset[str] | None = None
        if names and ALL_METHODS not in names:
            unknown = sorted(names - API_METHODS)
            if unknown:
                raise ConfigError(
                    f"{where}: unknown methods {unknown}; known: {sorted(API_METHODS)} or *"
                )
            methods = frozenset(names)
        entries.append(TokenEntry(digest, methods))
    if not entries:
        raise ConfigError(f"{source}: no tokens (every call would be refused)")
    return entries


def load_tokens(path: Path) -> list[TokenEntry]:
    text = _read(path, "auth_tokens_file").decode("utf-8", errors="replace")
    return parse_token_lines(text.splitlines(), f"auth_tokens_file {path}")


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token (UNAUTHENTICATED) or without the permission
    for their method (PERMISSION_DENIED), before any handler code runs.

    Install it after the telemetry interceptor (so refusals are counted and traced with their
    status code) and before the error mapping.
    """

    def __init__(self, tokens: Iterable[TokenEntry]) -> None:
        self._tokens = tuple(tokens)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenAuthInterceptor | None:
        if settings.auth_tokens_file is None:
            return None
        return cls(load_tokens(settings.auth_tokens_file))

    def check(self, full_method: str, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """Raise Unauthenticated or PermissionDenied unless the call may go ahead.

        Fail-closed: only the infrastructure services (health checks and reflection: probes and
        tooling must work before auth does) are reached without a token.
        """
        info = method_info(full_method)
        if info.is_infrastructure:
            return
        method = info.method
        presented = _bearer_token(metadata)
        if presented is None:
            raise Unauthenticated("missing bearer token")
        digest = hashlib.sha256(presented.encode()).digest()
        match: TokenEntry | None = None
        for entry in self._tokens:  # every entry is compared: no early exit on a match
            if hmac.compare_digest(digest, entry.digest) and match is None:
                match = entry
        if match is None:
            raise Unauthenticated("invalid bearer token")
        if not match.allows(method):
            raise PermissionDenied(f"the token does not allow {method}")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)
        try:
            self.check(method, handler_call_details.invocation_metadata)
        except VoicegateError as exc:
            refusal: VoicegateError | None = exc
        else:
            refusal = None
        handler = await continuation(handler_call_details)
        if handler is None or refusal is None:
            return handler
        error = refusal
        return rewrap_handler(
            handler,
            wrap_unary=lambda _behavior: _refuse_unary(error, method),
            wrap_stream=lambda _behavior: _refuse_stream(error, method),
        )


def _bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        scheme, _, token = str(value).strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


def _refuse_unary(error: VoicegateError, method: str) -> Callable[..., Any]:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort_with(context, error, method)

    return refuse


def _refuse_stream(error: VoicegateError, method: str) -> Callable[..., Any]:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await abort_with(context, error, method)
        yield  # pragma: no cover - abort raises; this makes the function a generator

    return refuse


__all__ = [
    "TokenAuthInterceptor",
    "TokenEntry",
    "hash_token",
    "load_tokens",
    "parse_token_lines",
    "server_credentials",
]
