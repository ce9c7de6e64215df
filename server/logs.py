"""Logging set-up for `voicegate serve`: text or JSON lines, with trace context.

Every record written inside a request carries the ids of the span current at that moment
(`trace_id`, `span_id`, as in W3C `traceparent`) and the gRPC method, so a log line leads to its
trace and back. Audio and embeddings are never logged: records hold messages, not payloads.
"""

from __future__ import annotations

import logging
from typing import IO

from opentelemetry import trace

from server.telemetry import RPC_METHOD

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = ("asctime", "levelname", "name", "message")
JSON_RENAMES = {"asctime": "time", "levelname": "level", "name": "logger"}


class TraceContextFilter(logging.Filter):
    """Adds `trace_id`, `span_id` and `rpc_method` to records made inside a span."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
            record.trace_sampled = context.trace_flags.sampled
        method = RPC_METHOD.get()
        if method != "none":
            record.rpc_method = method
        return True


class TextFormatter(logging.Formatter):
    """One line per record; `trace_id=... span_id=...` appended inside a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        if trace_id is None:
            return line
        head, newline, rest = line.partition("\n")  # keep a traceback below the ids
        ids = f" trace_id={trace_id} span_id={getattr(record, 'span_id', '')}"
        return f"{head}{ids}{newline}{rest}"


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time, level, logger, message, trace ids, exception."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(list(JSON_FIELDS), rename_fields=JSON_RENAMES, timestamp=False)


def make_handler(log_format: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """A stderr (or `stream`) handler in `log_format` (text or json) with trace context."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(json_formatter() if log_format == "json" else TextFormatter())
    return handler


def configure_logging(level: str, log_format: str = "text") -> None:
    """Root logging for the server: `log_format` text or json on stderr, at `level`."""
    logging.basicConfig(level=level.upper(), handlers=[make_handler(log_format)], force=True)
