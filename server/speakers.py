"""Enrollment, verification against enrolled speakers and identification, without gRPC.

`SpeakerDirectory` joins the speaker core (embeddings and MFCC statistics of audio), the
durable store (`server.store`) and the in-memory identification index
(`server.speaker_index`). Store calls run on the directory's own threads (as many as the
store has connections, `store_pool_size`), scoring and index updates on two more, never on the
event loop.

A voiceprint is bound to the encoder that made it: the model name and a fingerprint, the
model's name and the version Triton serves it at (`ge2e_int8@1`, from Triton's model
metadata). Verify and Identify compare a probe only with voiceprints of the server's current
encoder fingerprint; others answer FAILED_PRECONDITION (Verify) or are left out and counted
(Identify) until re-enrolled. Publishing changed encoder weights therefore means a new model
version directory in the Triton repository (Triton's own convention), not overwriting one.

Identify sees every change committed before it started: it first applies the store's
changes since the index's version (one cheap query when nothing changed; see `server.store`),
so replicas sharing a PostgreSQL store agree, and so do processes sharing one SQLite file.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from server.config import Settings
from server.core import AudioInput, SpeakerCore, VerifyResult
from server.errors import FailedPrecondition, InvalidArgument, NotFound
from server.fusion import Calibration
from server.mfcc import MFCC_DIMENSION, mfcc_score, standardised_units
from server.speaker_index import SpeakerIndex
from server.store import (
    Changes,
    Enrollment,
    EnrollMode,
    SpeakerRecord,
    SpeakerStore,
    open_store,
    stale_message,
)
from server.telemetry import DISABLED, Telemetry

log = logging.getLogger(__name__)

SPEAKER_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_ENROLL_AUDIO = 32
DEFAULT_TOP_K = 5
MAX_TOP_K = 100
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# How long a model's fingerprint (Triton's model version) is trusted before it is asked again.
FINGERPRINT_TTL_S = 30.0
# Threads for in-memory index work (Identify's search, applying the store's changes).
INDEX_THREADS = 2
T = TypeVar("T")


def check_speaker_id(speaker_id: str, field: str = "speaker_id") -> str:
    """The id if it is well formed, else INVALID_ARGUMENT naming the rule."""
    if not speaker_id:
        raise InvalidArgument(f"{field} is required", field=field)
    if SPEAKER_ID_PATTERN.fullmatch(speaker_id) is None:
        raise InvalidArgument(
            f"{field} must be 1 to 128 characters from A-Z, a-z, 0-9, '.', '_', ':' and '-'",
            field=field,
        )
    return speaker_id


@dataclass(frozen=True)
class OperatingPoint:
    """The calibrated operating point behind a same-speaker decision."""

    threshold: float
    target_far: float  # 0: the equal-error point
    rule: str
    calibrated_far: float  # fractions; 0 when the calibration file does not say
    calibrated_frr: float

    @classmethod
    def from_calibration(cls, calibration: Calibration) -> OperatingPoint:
        point = calibration.figures.get("operating_point")
        point = point if isinstance(point, dict) else {}
        rule = str(point.get("rule") or calibration.method)
        target = point.get("target_far")
        if not isinstance(target, int | float):
            found = re.search(r"FAR <= ([0-9.eE+-]+)", rule)
            target = float(found.group(1)) if found else 0.0
        return cls(
            threshold=calibration.threshold,
            target_far=float(target),
            rule=rule,
            calibrated_far=_fraction(point.get("held_out_far_percent")),
            calibrated_frr=_fraction(point.get("held_out_frr_percent")),
        )


def _fraction(percent: object) -> float:
    if isinstance(percent, int | float) and math.isfinite(percent):
        return float(percent) / 100.0
    return 0.0


@dataclass(frozen=True)
class IdentifyMatch:
    speaker_id: str
    score: float
    same_speaker: bool
    scores: dict[str, float]


@dataclass(frozen=True)
class IdentifyResult:
    matches: list[IdentifyMatch]
    compared: int
    stale: int
    speech_seconds: float


class SpeakerDirectory:
    """Enrolled speakers: enroll, verify against, identify among, get, list and delete."""

    def __init__(
        self,
        settings: Settings,
        core: SpeakerCore,
        store: SpeakerStore,
        model_version: Callable[[str], Awaitable[str]],
    ) -> None:
        self._settings = settings
        self._core = core
        self._store = store
        self._model_version = model_version
        self._index = SpeakerIndex(MFCC_DIMENSION)
        # A store call holds a thread while it waits for a connection: one per connection.
        self._store_executor = ThreadPoolExecutor(
            settings.store_pool_size, thread_name_prefix="speakers-store"
        )
        self._index_executor = ThreadPoolExecutor(
            INDEX_THREADS, thread_name_prefix="speakers-index"
        )
        self._telemetry: Telemetry = getattr(core, "telemetry", DISABLED)
        self._fingerprints: dict[str, tuple[str, float]] = {}
        self._sync_lock = asyncio.Lock()
        self._syncs_started = 0
        self._syncs_done = 0
        self._calibration = core.calibration

    @classmethod
    async def open(
        cls,
        settings: Settings,
        core: SpeakerCore,
        model_version: Callable[[str], Awaitable[str]],
    ) -> SpeakerDirectory:
        """Open the store `settings.speaker_store_url` names (`settings.store_pool_size`
        connections) and load the index from it."""
        url = settings.speaker_store_url
        store = await asyncio.to_thread(open_store, url, settings.store_pool_size)
        directory = cls(settings, core, store, model_version)
        try:
            await directory.sync()
        except BaseException:
            await directory.close()
            raise
        log.info("speaker store %s: %d speakers enrolled", store.url_for_log, len(directory._index))
        return directory

    @property
    def store(self) -> SpeakerStore:
        return self._store

    @property
    def index(self) -> SpeakerIndex:
        return self._index

    async def close(self) -> None:
        self._index.close()
        self._index_executor.shutdown(wait=True, cancel_futures=True)
        self._store_executor.shutdown(wait=True, cancel_futures=True)
        await asyncio.to_thread(self._store.close)

    # ---------------------------------------------------------------- the operations

    async def enroll(
        self,
        speaker_id: str,
        audio: Sequence[AudioInput],
        mode: EnrollMode = EnrollMode.CREATE_OR_APPEND,
        timeout_s: float | None = None,
    ) -> SpeakerRecord:
        """Embed every recording, then add them to the speaker in one store transaction."""
        check_speaker_id(speaker_id)
        if not audio:
            raise InvalidArgument(
                "audio is required: at least one recording to enroll", field="audio"
            )
        if len(audio) > MAX_ENROLL_AUDIO:
            raise InvalidArgument(
                f"audio has {len(audio)} recordings; at most {MAX_ENROLL_AUDIO} per call",
                field="audio",
            )
        model = self._settings.encoder_model
        analysed, fingerprint = await asyncio.gather(
            asyncio.gather(
                *(
                    self._core.embed_with_mfcc(item, f"audio[{i}]", timeout_s=timeout_s)
                    for i, item in enumerate(audio)
                )
            ),
            self.fingerprint(model),
        )
        enrollment = Enrollment(
            model=model,
            model_version=fingerprint,
            embedding_sum=np.sum(
                [np.asarray(e.embedding, dtype=np.float64) for e, _ in analysed], axis=0
            ),
            mfcc_sum=np.sum([np.asarray(m, dtype=np.float64) for _, m in analysed], axis=0),
            count=len(analysed),
            speech_seconds=float(sum(e.speech_seconds for e, _ in analysed)),
        )
        record = await self._in_store(self._store.enroll, speaker_id, enrollment, mode)
        log.info(
            "enrolled speaker %s: %d recordings added (%d in total), revision %d",
            speaker_id,
            enrollment.count,
            record.enrollment_count,
            record.revision,
        )
        return record

    async def verify(
        self, speaker_id: str, probe: AudioInput, timeout_s: float | None = None
    ) -> VerifyResult:
        """Verify's answer with an enrolled speaker's voiceprint as the reference."""
        check_speaker_id(speaker_id)
        model = self._settings.encoder_model
        (embedded, statistics), record, fingerprint = await asyncio.gather(
            self._core.embed_with_mfcc(probe, "probe", timeout_s=timeout_s),
            self._in_store(self._store.get, speaker_id, True),
            self.fingerprint(model),
        )
        record = self._usable(speaker_id, record, model, fingerprint)
        ge2e = float(np.dot(record.voiceprint.astype(np.float64), embedded.embedding))
        mfcc = mfcc_score(record.mfcc_mean, statistics, self._calibration.mfcc_normalization)
        fused = self._calibration.fuse(ge2e, mfcc)
        return VerifyResult(
            score=fused,
            same_speaker=self._calibration.decide(fused),
            threshold=self._calibration.threshold,
            scores={"ge2e": ge2e, "mfcc": mfcc},
        )

    async def identify(
        self, audio: AudioInput, top_k: int = 0, timeout_s: float | None = None
    ) -> IdentifyResult:
        """The `top_k` enrolled speakers most like `audio`, best first."""
        if top_k < 0 or top_k > MAX_TOP_K:
            raise InvalidArgument(
                f"top_k must be 0 (default {DEFAULT_TOP_K}) to {MAX_TOP_K}", field="top_k"
            )
        k = top_k or DEFAULT_TOP_K
        model = self._settings.encoder_model
        (embedded, statistics), fingerprint, _ = await asyncio.gather(
            self._core.embed_with_mfcc(audio, "audio", timeout_s=timeout_s),
            self.fingerprint(model),
            self.sync(),
        )
        calibration = self._calibration
        result = await self._in_index(
            self._index.search,
            embedded.embedding,
            standardised_units(statistics[None, :], calibration.mfcc_normalization)[0],
            calibration.ge2e_weight,
            calibration.mfcc_weight,
            k,
            (model, fingerprint),
        )
        matches = []
        for match in result.matches:
            fused = calibration.fuse(match.ge2e, match.mfcc)
            matches.append(
                IdentifyMatch(
                    speaker_id=match.speaker_id,
                    score=fused,
                    same_speaker=calibration.decide(fused),
                    scores={"ge2e": match.ge2e, "mfcc": match.mfcc},
                )
            )
        return IdentifyResult(
            matches=matches,
            compared=result.compared,
            stale=result.stale,
            speech_seconds=embedded.speech_seconds,
        )

    async def get(self, speaker_id: str) -> SpeakerRecord:
        check_speaker_id(speaker_id)
        record = await self._in_store(self._store.get, speaker_id, False)
        if record is None:
            raise NotFound(f"speaker {speaker_id!r} is not enrolled")
        return record

    async def list(
        self, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[SpeakerRecord], str]:
        """One page of records in id order and the next page's token ('' on the last)."""
        if page_size < 0:
            raise InvalidArgument("page_size must be >= 0", field="page_size")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token) if page_token else None
        records = await self._in_store(self._store.list, size + 1, after)
        if len(records) > size:
            return records[:size], _encode_page_token(records[size - 1].speaker_id)
        return records, ""

    async def delete(self, speaker_id: str) -> None:
        check_speaker_id(speaker_id)
        if not await self._in_store(self._store.delete, speaker_id):
            raise NotFound(f"speaker {speaker_id!r} is not enrolled")
        log.info("deleted speaker %s", speaker_id)
        # Drop it from this replica's memory now; other replicas do at their next sync.
        await self.sync()

    async def fingerprint(self, model: str) -> str:
        """`model@version` of the encoder Triton serves now (cached FINGERPRINT_TTL_S)."""
        cached = self._fingerprints.get(model)
        now = time.monotonic()
        if cached is not None and now - cached[1] < FINGERPRINT_TTL_S:
            return cached[0]
        version = await self._model_version(model)
        fingerprint = f"{model}@{version}"
        self._fingerprints[model] = (fingerprint, now)
        return fingerprint

    async def sync(self) -> None:
        """Bring the index up to the store's current version.

        Concurrent callers share one refresh: a caller waits for a refresh that started after
        it arrived, so it sees every change committed before it called.
        """
        arrived = self._syncs_started
        async with self._sync_lock:
            if self._syncs_done > arrived:
                return
            self._syncs_started += 1
            ticket = self._syncs_started
            changes = await self._in_store(self._store.changes_since, self._index.version)
            if changes.full or changes.upserted or changes.deleted:
                await self._in_index(self._apply, changes)
            else:
                self._index.version = changes.version
            self._syncs_done = ticket

    # ---------------------------------------------------------------- internals

    def _apply(self, changes: Changes) -> None:
        index = self._index
        rows = None
        if changes.upserted:
            records = changes.upserted
            rows = (
                np.stack([r.voiceprint for r in records]),
                standardised_units(
                    np.stack([r.mfcc_mean for r in records]), self._calibration.mfcc_normalization
                ),
            )
        with index.updating():  # an Identify sees all of these changes or none
            if changes.full:
                index.clear()
            for speaker_id in changes.deleted:
                index.remove(speaker_id)
            if rows is not None:
                index.put_many(
                    [r.speaker_id for r in changes.upserted],
                    rows[0],
                    rows[1],
                    [r.model_key() for r in changes.upserted],
                )
            index.version = changes.version

    def _usable(
        self, speaker_id: str, record: SpeakerRecord | None, model: str, fingerprint: str
    ) -> SpeakerRecord:
        if record is None:
            raise NotFound(f"speaker {speaker_id!r} is not enrolled")
        if record.model_key() != (model, fingerprint):
            raise FailedPrecondition(stale_message(record, fingerprint))
        return record

    async def _in_store(self, function: Callable[..., T], *args: object) -> T:
        """Run a store call on the store threads, as a `store.*` span with `db.system`."""
        name = "store." + function.__name__
        attributes = {"db.system": self._store.db_system}
        return await self._in_thread(self._store_executor, name, attributes, function, *args)

    async def _in_index(self, function: Callable[..., T], *args: object) -> T:
        """Run in-memory index work on the index threads, as an `index.*` span."""
        name = "index." + function.__name__.lstrip("_")
        return await self._in_thread(self._index_executor, name, None, function, *args)

    async def _in_thread(
        self,
        executor: ThreadPoolExecutor,
        name: str,
        attributes: dict[str, str] | None,
        function: Callable[..., T],
        *args: object,
    ) -> T:
        loop = asyncio.get_running_loop()
        telemetry = self._telemetry

        def work() -> T:
            with telemetry.stage(name, attributes):
                return function(*args)

        # The worker runs in the caller's context: the span is a child of the RPC's span.
        context = contextvars.copy_context()
        return await loop.run_in_executor(executor, context.run, work)


def _encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"after:{last_id}".encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> str:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    prefix, _, last_id = text.partition(":")
    if prefix != "after" or SPEAKER_ID_PATTERN.fullmatch(last_id) is None:
        raise InvalidArgument("page_token is not one this service issued", field="page_token")
    return last_id
