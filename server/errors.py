"""One exception hierarchy for everything the service reports to a caller.

Each class carries a guaranteed, caller-safe message and the gRPC status code it maps to; the
mapping to gRPC happens in one place (`server.grpc_errors`). Anything that is not a
`VoicegateError` becomes an opaque INTERNAL there.
"""

from __future__ import annotations

from enum import Enum


class StatusCode(Enum):
    """The gRPC status codes this service uses, named without importing grpc."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class VoicegateError(Exception):
    """Base of every error whose message may be shown to a caller."""

    status = StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        if not message:
            raise ValueError("a VoicegateError needs a message")
        super().__init__(message)
        self.message = message


class InvalidArgument(VoicegateError):
    """The request is malformed: the message names the field and what is wrong.

    `field` is the path of the offending request field (`audio.raw.sample_rate_hz`,
    `audio[2].content`, `top_k`) and `description` what is wrong with it (default: the
    message); the caller gets both as a `google.rpc.BadRequest` field violation.
    """

    status = StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, field: str | None = None, description: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.description = description or message


class InvalidAudio(InvalidArgument):
    """Audio that is empty, undecodable, of an unknown format or inconsistent with its header."""


class NotEnoughSpeech(InvalidArgument):
    """Too little speech is left after silence trimming to compute an embedding."""


class NotFound(VoicegateError):
    """The named resource (for example an enrolled speaker) does not exist."""

    status = StatusCode.NOT_FOUND


class AlreadyExists(VoicegateError):
    """The resource a create-only request names exists already."""

    status = StatusCode.ALREADY_EXISTS


class FailedPrecondition(VoicegateError):
    """The system is not in a state the request needs (for example a stale voiceprint)."""

    status = StatusCode.FAILED_PRECONDITION


class StoreUnavailable(VoicegateError):
    """The speaker store (SQLite file or PostgreSQL server) cannot be reached or used."""

    status = StatusCode.UNAVAILABLE


class BackendUnavailable(VoicegateError):
    """Triton cannot be reached or its models are not ready."""

    status = StatusCode.UNAVAILABLE


class Overloaded(VoicegateError):
    """The server is at its bound on work in flight: the call is refused at once, not queued.

    Safe to retry after a backoff (nothing was done), ideally on another replica.
    """

    status = StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(VoicegateError):
    """The caller's deadline passed while work was still running."""

    status = StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(VoicegateError):
    """The call carries no valid credentials (a missing or unknown bearer token)."""

    status = StatusCode.UNAUTHENTICATED


class PermissionDenied(VoicegateError):
    """The caller is authenticated but its token does not allow this method."""

    status = StatusCode.PERMISSION_DENIED


class ConfigError(VoicegateError):
    """A setting has an invalid value (raised at start-up, never to a caller)."""


class ExportError(VoicegateError):
    """The export or one of its validation checks failed."""
