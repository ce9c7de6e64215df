"""Logging set-up for `voicegate serve`."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    """Plain one-line records on stderr; audio and embeddings are never logged."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
