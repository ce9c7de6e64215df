"""The speaker store (SQLite and a real PostgreSQL), the identification index and the speaker
directory's consistency across replicas, without Triton (a stand-in core embeds)."""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.config import Settings
from server.core import EmbedResult
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from server.fusion import Calibration
from server.mfcc import MFCC_DIMENSION
from server.speaker_index import SpeakerIndex
from server.speakers import OperatingPoint, SpeakerDirectory, check_speaker_id
from server.store import (
    Enrollment,
    EnrollMode,
    PostgresStore,
    SpeakerStore,
    SqliteStore,
    open_store,
)

MODEL = ("ge2e_int8", "ge2e_int8@1")


def _reset_postgres(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS speakers, speaker_tombstones, speaker_store_state")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'speakers.db'}"
    url: str = request.getfixturevalue("pg_url")
    _reset_postgres(url)
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[SpeakerStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()


def enrollment(seed: int, count: int = 1, model: tuple[str, str] = MODEL) -> Enrollment:
    rng = np.random.default_rng(seed)
    return Enrollment(
        model=model[0],
        model_version=model[1],
        embedding_sum=rng.standard_normal(256),
        mfcc_sum=rng.standard_normal(MFCC_DIMENSION),
        count=count,
        speech_seconds=1.5 * count,
    )


# ------------------------------------------------------------------ the store


def test_enroll_creates_then_appends_exactly(store: SpeakerStore) -> None:
    first, second = enrollment(1), enrollment(2, count=2)
    created = store.enroll("alice", first)
    assert (created.enrollment_count, created.speech_seconds) == (1, 1.5)
    appended = store.enroll("alice", second)
    assert appended.enrollment_count == 3
    assert appended.speech_seconds == pytest.approx(4.5)
    assert appended.revision > created.revision
    assert appended.create_time == created.create_time
    stored = store.get("alice", with_voiceprint=True)
    assert stored is not None
    np.testing.assert_array_equal(stored.embedding_sum, first.embedding_sum + second.embedding_sum)
    np.testing.assert_array_equal(stored.mfcc_sum, first.mfcc_sum + second.mfcc_sum)
    expected = first.embedding_sum + second.embedding_sum
    np.testing.assert_allclose(stored.voiceprint, expected / np.linalg.norm(expected), atol=1e-7)
    np.testing.assert_allclose(stored.mfcc_mean, (first.mfcc_sum + second.mfcc_sum) / 3)
    metadata = store.get("alice")
    assert metadata is not None and metadata.embedding_sum is None
    assert store.get("bob") is None


def test_enroll_modes(store: SpeakerStore) -> None:
    with pytest.raises(NotFound):
        store.enroll("carol", enrollment(1), EnrollMode.APPEND)
    store.enroll("carol", enrollment(1), EnrollMode.CREATE)
    with pytest.raises(AlreadyExists):
        store.enroll("carol", enrollment(2), EnrollMode.CREATE)
    assert store.enroll("carol", enrollment(2), EnrollMode.APPEND).enrollment_count == 2
    replaced = store.enroll("carol", enrollment(3, count=4), EnrollMode.REPLACE)
    assert replaced.enrollment_count == 4
    stored = store.get("carol", with_voiceprint=True)
    assert stored is not None
    np.testing.assert_array_equal(stored.embedding_sum, enrollment(3).embedding_sum)
    # A failed enrollment uses up no change number.
    version = store.version()
    with pytest.raises(AlreadyExists):
        store.enroll("carol", enrollment(2), EnrollMode.CREATE)
    assert store.version() == version


def test_voiceprint_of_another_model_version_must_be_reenrolled(store: SpeakerStore) -> None:
    store.enroll("dave", enrollment(1, model=("ge2e_int8", "ge2e_int8@1")))
    with pytest.raises(FailedPrecondition, match="must be re-enrolled"):
        store.enroll("dave", enrollment(2, model=("ge2e_int8", "ge2e_int8@2")))
    replaced = store.enroll(
        "dave", enrollment(2, model=("ge2e_int8", "ge2e_int8@2")), EnrollMode.REPLACE
    )
    assert (replaced.model_version, replaced.enrollment_count) == ("ge2e_int8@2", 1)


def test_list_pages_in_id_order_and_delete(store: SpeakerStore) -> None:
    ids = ["b-2", "A", "a", "b-10", "Z.9", "x:y"]
    for i, speaker_id in enumerate(ids):
        store.enroll(speaker_id, enrollment(i))
    seen, after = [], None
    while True:
        page = store.list(2, after)
        if not page:
            break
        seen += [r.speaker_id for r in page]
        after = page[-1].speaker_id
    assert seen == sorted(ids)
    assert store.delete("a") is True
    assert store.delete("a") is False
    assert store.get("a") is None
    assert [r.speaker_id for r in store.list(10)] == sorted(set(ids) - {"a"})


def test_changes_since_follows_every_write(store: SpeakerStore) -> None:
    assert store.changes_since(None).full
    store.enroll("a", enrollment(1))
    store.enroll("b", enrollment(2))
    start = store.version()
    store.enroll("a", enrollment(3))
    store.delete("b")
    store.enroll("c", enrollment(4))
    changes = store.changes_since(start)
    assert not changes.full
    assert changes.version == store.version() == start + 3
    assert sorted(r.speaker_id for r in changes.upserted) == ["a", "c"]
    assert changes.deleted == ["b"]
    assert all(r.embedding_sum is not None for r in changes.upserted)
    nothing = store.changes_since(changes.version)
    assert (nothing.upserted, nothing.deleted, nothing.full) == ([], [], False)
    # Re-created after a delete: a row again, no tombstone.
    store.enroll("b", enrollment(5))
    again = store.changes_since(changes.version)
    assert [r.speaker_id for r in again.upserted] == ["b"] and again.deleted == []
    full = store.changes_since(None)
    assert full.full and sorted(r.speaker_id for r in full.upserted) == ["a", "b", "c"]


def test_concurrent_appends_from_two_replicas_lose_nothing(store_url: str) -> None:
    replicas = [open_store(store_url), open_store(store_url)]
    try:
        replicas[0].enroll("shared", enrollment(0))
        per_thread, threads = 15, 4
        errors: list[BaseException] = []

        def work(replica: SpeakerStore, seed: int) -> None:
            try:
                for i in range(per_thread):
                    replica.enroll("shared", enrollment(1000 * seed + i))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        workers = [
            threading.Thread(target=work, args=(replicas[t % 2], t + 1)) for t in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == []
        stored = replicas[1].get("shared", with_voiceprint=True)
        assert stored is not None
        assert stored.enrollment_count == 1 + per_thread * threads
        expected = enrollment(0).embedding_sum + sum(
            enrollment(1000 * (t + 1) + i).embedding_sum
            for t in range(threads)
            for i in range(per_thread)
        )
        np.testing.assert_allclose(stored.embedding_sum, expected, rtol=1e-12)
        assert replicas[0].version() == 1 + per_thread * threads
    finally:
        for replica in replicas:
            replica.close()


def test_concurrent_creates_exactly_one_wins(store_url: str) -> None:
    replicas = [open_store(store_url) for _ in range(2)]
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def create(replica: SpeakerStore, seed: int) -> None:
        barrier.wait()
        try:
            replica.enroll("once", enrollment(seed), EnrollMode.CREATE)
            outcomes.append("created")
        except AlreadyExists:
            outcomes.append("exists")

    workers = [threading.Thread(target=create, args=(replicas[i % 2], i)) for i in range(6)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        for replica in replicas:
            replica.close()
    assert sorted(outcomes) == ["created"] + ["exists"] * 5


def test_sqlite_file_is_private_durable_and_forgets_deleted_voiceprints(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "data" / "speakers.db")
    try:
        marker = np.full(256, 1234.5678)  # a recognisable byte pattern
        store.enroll("erin", Enrollment(*MODEL, marker, np.zeros(MFCC_DIMENSION), 1, 2.0))
        connection = store._connection()
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert (tmp_path / "data" / "speakers.db").stat().st_mode & 0o077 == 0
        pattern = marker[:4].astype("<f8").tobytes()
        files = [p for p in (tmp_path / "data").iterdir() if p.is_file()]
        assert any(pattern in p.read_bytes() for p in files)
        assert store.delete("erin")
        files = [p for p in (tmp_path / "data").iterdir() if p.is_file()]
        assert not any(pattern in p.read_bytes() for p in files)
    finally:
        store.close()


def test_open_store_rejects_unknown_urls(tmp_path: Path) -> None:
    from server.errors import ConfigError

    with pytest.raises(ConfigError, match="store_url"):
        open_store("mysql://nope")
    with pytest.raises(ConfigError, match="store_url"):
        Settings.load({"store_url": "redis://x"}, environ={})
    settings = Settings.load({"state_dir": tmp_path}, environ={})
    assert settings.speaker_store_url == f"sqlite:///{tmp_path}/speakers.db"


def test_postgres_unreachable_is_a_clear_config_error(tmp_path: Path) -> None:
    from server.errors import ConfigError

    url = f"postgresql://nobody:secret@/voicegate?host={tmp_path}&port=1"
    with pytest.raises(ConfigError) as caught:
        PostgresStore(url, connect_timeout_s=1.0)
    assert "secret" not in caught.value.message


# ------------------------------------------------------------------ the index


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("int8_min_rows", [0, 10**9])
def test_index_top_k_is_the_exact_float32_top_k(int8_min_rows: int) -> None:
    rng = np.random.default_rng(7)
    n = 3000
    index = SpeakerIndex(MFCC_DIMENSION, block=1024, int8_min_rows=int8_min_rows)
    voiceprints, mfcc = _unit(rng, n, 256), _unit(rng, n, MFCC_DIMENSION)
    keys = [MODEL if i % 10 else ("ge2e_int8", "ge2e_int8@0") for i in range(n)]
    index.put_many([f"s{i}" for i in range(n)], voiceprints, mfcc, keys)
    for i in range(0, n, 7):
        assert index.remove(f"s{i}")
    alive = np.array([i % 7 != 0 and i % 10 != 0 for i in range(n)])
    assert index.count(MODEL) == alive.sum()
    for trial in range(25):
        if trial == 12:
            index.pack_now()  # the second half through prepacked blocks
        j = int(rng.integers(n))
        probe = voiceprints[j] + 0.7 * _unit(rng, 1, 256)[0]
        probe_mfcc = mfcc[j] + 0.9 * _unit(rng, 1, MFCC_DIMENSION)[0]
        probe /= np.linalg.norm(probe)
        probe_mfcc /= np.linalg.norm(probe_mfcc)
        k = 1 + trial % 8
        result = index.search(probe, probe_mfcc, 18.8, 10.1, k, MODEL)
        logits = 18.8 * (voiceprints @ probe) + 10.1 * (mfcc @ probe_mfcc)
        logits[~alive] = -np.inf
        expected = [f"s{i}" for i in np.argsort(-logits)[:k]]
        assert [m.speaker_id for m in result.matches] == expected
        assert result.compared == alive.sum()
        assert result.stale == n - n // 7 - 1 - result.compared
        top = int(expected[0][1:])
        assert result.matches[0].ge2e == pytest.approx(float(voiceprints[top] @ probe), abs=1e-5)
        if int8_min_rows == 0:
            assert result.rescored < result.compared
    index.close()


def test_index_put_replaces_and_remove_forgets() -> None:
    rng = np.random.default_rng(1)
    index = SpeakerIndex(MFCC_DIMENSION, int8_min_rows=0)
    a, b = _unit(rng, 2, 256), _unit(rng, 2, MFCC_DIMENSION)
    index.put("x", a[0], b[0], MODEL)
    index.put("x", a[1], b[1], MODEL)
    assert len(index) == 1
    found = index.search(a[1], b[1], 1.0, 1.0, 5, MODEL).matches
    assert [m.speaker_id for m in found] == ["x"] and found[0].ge2e == pytest.approx(1.0)
    assert index.search(a[1], b[1], 1.0, 1.0, 5, ("other", "model")).matches == []
    assert index.remove("x") and not index.remove("x")
    assert not index._rows.any()  # nothing of it stays in memory
    assert not any(block.any() for block in index._blocks)
    assert index.search(a[1], b[1], 1.0, 1.0, 5, MODEL).matches == []


def test_hand_encoded_int8_models_are_valid_onnx() -> None:
    onnx = pytest.importorskip("onnx")
    from server.speaker_index import int8_scores_model

    generic = onnx.load_from_string(int8_scores_model())
    onnx.checker.check_model(generic)
    assert [node.op_type for node in generic.graph.node] == ["MatMulInteger"]
    assert [i.name for i in generic.graph.input] == ["query", "block"]
    block = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    packed = onnx.load_from_string(int8_scores_model(block))
    onnx.checker.check_model(packed)
    assert [i.name for i in packed.graph.input] == ["query"]
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in packed.graph.initializer}
    np.testing.assert_array_equal(initializers["block"], block)
    assert initializers["zero_point"] == 128


def test_packed_blocks_score_like_unpacked_ones_and_follow_changes() -> None:
    rng = np.random.default_rng(3)
    n = 1000
    index = SpeakerIndex(MFCC_DIMENSION, block=256, int8_min_rows=0, pack_delay_s=0.0)
    voiceprints, mfcc = _unit(rng, n, 256), _unit(rng, n, MFCC_DIMENSION)
    ids = [f"s{i}" for i in range(n)]
    index.put_many(ids, voiceprints, mfcc, [MODEL] * n)

    def top(probe: int) -> list[str]:
        result = index.search(voiceprints[probe], mfcc[probe], 18.8, 10.1, 3, MODEL)
        return [m.speaker_id for m in result.matches]

    try:
        unpacked = top(17)
        index.pack_now()
        assert all(p is not None for p in index._packed)
        assert top(17) == unpacked == ["s17", *unpacked[1:]]
        # Changing a speaker drops its block's packed session; the answer follows at once.
        index.put("s17", voiceprints[900], mfcc[900], MODEL)
        assert index._packed[0] is None
        assert top(900)[:2] in (["s17", "s900"], ["s900", "s17"])
        # Searches start packing it again in the background.
        deadline = time.monotonic() + 30
        while index._packed[0] is None:
            assert time.monotonic() < deadline
            index.search(voiceprints[1], mfcc[1], 1.0, 1.0, 1, MODEL)
            time.sleep(0.05)
        assert top(900)[:2] in (["s17", "s900"], ["s900", "s17"])
    finally:
        index.close()


# ------------------------------------------------------------------ the directory


class StandInCore:
    """Embeds `b"SPEAKER/TAKE"` as a fixed vector per speaker plus a little noise per take."""

    def __init__(self) -> None:
        self.calibration = Calibration.load()

    async def embed_with_mfcc(
        self, audio: bytes, field: str, timeout_s: float | None = None
    ) -> tuple[EmbedResult, np.ndarray]:
        speaker = bytes(audio).decode().partition("/")[0]
        base = np.random.default_rng(zlib.crc32(speaker.encode()))
        noise = np.random.default_rng(zlib.crc32(audio))
        embedding = base.standard_normal(256) + 0.3 * noise.standard_normal(256)
        std = np.asarray(self.calibration.mfcc_std)
        statistics = np.asarray(self.calibration.mfcc_mean) + std * (
            base.standard_normal(MFCC_DIMENSION) + 0.3 * noise.standard_normal(MFCC_DIMENSION)
        )
        result = EmbedResult(
            embedding=(embedding / np.linalg.norm(embedding)).astype(np.float32),
            model="ge2e_int8",
            speech_seconds=2.0,
            partial_count=2,
        )
        return result, statistics.astype(np.float32)


async def _version(model: str) -> str:
    return "1"


async def _directory(url: str) -> SpeakerDirectory:
    settings = Settings.load({}, environ={})
    store = await asyncio.to_thread(open_store, url)
    directory = SpeakerDirectory(settings, StandInCore(), store, _version)  # type: ignore[arg-type]
    await directory.sync()
    return directory


async def test_replicas_identify_what_the_other_enrolled_and_forget_deletes(
    store_url: str,
) -> None:
    first, second = await _directory(store_url), await _directory(store_url)
    try:
        for speaker in ("ann", "ben", "cat", "dan"):
            await first.enroll(speaker, [f"{speaker}/1".encode(), f"{speaker}/2".encode()])
        found = await second.identify(b"cat/9", top_k=3)
        assert found.matches[0].speaker_id == "cat"
        assert found.matches[0].same_speaker and not found.matches[-1].same_speaker
        assert found.compared == 4 and len(found.matches) == 3
        assert found.matches[0].score >= found.matches[1].score >= found.matches[2].score
        # Identify and Verify against the enrolled speaker agree.
        verified = await second.verify("cat", b"cat/9")
        assert verified.score == pytest.approx(found.matches[0].score, abs=1e-5)
        await first.delete("cat")
        after = await second.identify(b"cat/9", top_k=5)
        assert "cat" not in [m.speaker_id for m in after.matches]
        assert "cat" not in second.index
        await second.enroll("cat", [b"cat/3"], EnrollMode.CREATE)
        again = await first.identify(b"cat/9", top_k=1)
        assert [m.speaker_id for m in again.matches] == ["cat"]
    finally:
        await first.close()
        await second.close()


async def test_directory_validation_and_errors(tmp_path: Path) -> None:
    directory = await _directory(f"sqlite:///{tmp_path / 's.db'}")
    try:
        for bad in ("", "a b", "x" * 129, "é", "a/b"):
            with pytest.raises(InvalidArgument, match="speaker_id"):
                await directory.enroll(bad, [b"a/1"])
        check_speaker_id("A-z_0.9:" + "x" * 120)
        with pytest.raises(InvalidArgument, match="at least one"):
            await directory.enroll("ok", [])
        with pytest.raises(NotFound):
            await directory.verify("ghost", b"a/1")
        with pytest.raises(NotFound):
            await directory.get("ghost")
        with pytest.raises(NotFound):
            await directory.delete("ghost")
        with pytest.raises(InvalidArgument, match="top_k"):
            await directory.identify(b"a/1", top_k=101)
        with pytest.raises(InvalidArgument, match="page_token"):
            await directory.list(page_token="bm9wZQ")
        assert (await directory.identify(b"a/1")).matches == []
        # A voiceprint of another encoder version: Verify refuses, Identify leaves it out.
        directory.store.enroll("old", enrollment(1, model=("ge2e_int8", "ge2e_int8@0")))
        with pytest.raises(FailedPrecondition, match="re-enrolled"):
            await directory.verify("old", b"a/1")
        await directory.enroll("new", [b"new/1"])
        result = await directory.identify(b"new/2")
        assert [m.speaker_id for m in result.matches] == ["new"] and result.stale == 1
        names = []
        token = ""
        while True:
            page, token = await directory.list(page_size=1, page_token=token)
            names += [r.speaker_id for r in page]
            if not token:
                break
        assert names == ["new", "old"]
    finally:
        await directory.close()


def test_operating_point_from_calibration() -> None:
    calibration = Calibration.load()
    point = OperatingPoint.from_calibration(calibration)
    assert point.threshold == calibration.threshold
    assert 0.0 < point.calibrated_far < 0.5 and 0.0 < point.calibrated_frr < 0.5
    figures = dict(calibration.figures)
    figures["operating_point"] = {"rule": "FAR <= 0.01 on held-out fused scores"}
    legacy = Calibration(**{**calibration.__dict__, "figures": figures})
    assert OperatingPoint.from_calibration(legacy).target_far == pytest.approx(0.01)


def test_calibrate_command_targets_a_false_accept_rate_by_default() -> None:
    from server.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["calibrate"]).target_far == 0.01
    assert parser.parse_args(["calibrate", "--target-far", "0"]).target_far == 0.0
    serve = parser.parse_args(["serve", "--store-url", "postgresql://db/voicegate"])
    assert serve.store_url == "postgresql://db/voicegate"
    shipped = Calibration.load()
    assert shipped.figures["operating_point"]["target_far"] == 0.01
