"""The in-memory identification index: every enrolled voiceprint in one matrix, scored at once.

Each speaker is one row `x = [v, m]`: its unit voiceprint `v` (256) and its unit, standardised
mean MFCC statistics `m` (230). Verify's fused score is `sigmoid(w_ge2e * v.e + w_mfcc * m.f + b)`
for a probe's unit embedding `e` and standardised statistics `f`, so with the query
`p = [w_ge2e * e, w_mfcc * f]` the logit of every speaker is one matrix-vector product `X p`,
and the top k by logit are the top k by fused score (the sigmoid is monotonic).

Scoring 100,000 rows of 486 float32 reads 194 MB, about 20 ms on one core: memory-bound. So
above `int8_min_rows` rows a first pass reads an int8 copy (per-row scale, a quarter of the
bytes) with ONNX Runtime's MatMulInteger (uint8 query x int8 matrix, exact int32 sums), and
bounds each row's quantisation error:

    |x.p - s_x s_p (xq.pq)| <= s_x s_p (||xq||_1 / 2 + ||pq||_1 / 2 + D / 4)

(x = s_x (xq + ex), p = s_p (pq + ep), |ex|, |ep| <= 1/2 elementwise). Every row whose upper
bound reaches the k-th largest lower bound is rescored in float32, so the result is exactly
the float32 top k, not an approximation; usually only a few hundred rows are rescored.
The int8 copy is kept in blocks of `block` columns ([D, block] int8, a speaker per column).
MatMulInteger is twice as fast when its matrix is a constant that ONNX Runtime has prepacked
(measured 4.2 vs 7.4 ms for 100,000 speakers), so each block that has not changed for
`pack_delay_s` gets a session of its own with the block as an initializer, built on a
background thread; a block changed since then is scored through the generic session, whose
matrix is an input, until it is packed again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

GE2E_DIM = 256
_UINT8, _INT8, _INT32 = 2, 3, 6  # ONNX TensorProto data types


@dataclass(frozen=True)
class Match:
    """One speaker's exact float32 scores: the logit and its two cosines."""

    speaker_id: str
    logit: float
    ge2e: float
    mfcc: float


@dataclass(frozen=True)
class SearchResult:
    matches: list[Match]
    compared: int  # speakers of the query's model key
    stale: int  # speakers of another model key, left out
    rescored: int  # rows scored in float32 (all compared ones without the int8 pass)


def int8_scores_model(block: np.ndarray | None = None) -> bytes:
    """An ONNX model (opset 10): dots int32 [1, n] = MatMulInteger(query uint8 [1, d] with
    zero point 128, block int8 [d, n]). With `block` given, it is a constant initializer
    (ONNX Runtime prepacks it); without, `block` is an input of any size.

    Encoded by hand (protobuf wire format, ONNX field numbers) so the server needs only
    onnxruntime, not the onnx package; tests/test_store.py checks the result with onnx.
    """
    d: int | str = "d" if block is None else int(block.shape[0])
    n: int | str = "n" if block is None else int(block.shape[1])
    node = _text(1, "query") + _text(1, "block") + _text(1, "zero_point")
    node += _text(2, "dots") + _text(4, "MatMulInteger")
    graph = _field(1, node) + _text(2, "int8_scores")
    graph += _field(5, _tensor("zero_point", _UINT8, [], bytes([128])))
    if block is not None:
        raw = np.ascontiguousarray(block, dtype=np.int8).tobytes()
        graph += _field(5, _tensor("block", _INT8, [int(d), int(n)], raw))
    graph += _field(11, _value_info("query", _UINT8, [1, d]))
    if block is None:
        graph += _field(11, _value_info("block", _INT8, [d, n]))
    graph += _field(12, _value_info("dots", _INT32, [1, n]))
    opset = _field(8, _varint_field(2, 10))
    return _varint_field(1, 7) + _text(2, "voicegate") + _field(7, graph) + opset


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _text(number: int, value: str) -> bytes:
    return _field(number, value.encode())


def _tensor(name: str, data_type: int, dims: Sequence[int], raw: bytes) -> bytes:
    head = b"".join(_varint_field(1, dim) for dim in dims) + _varint_field(2, data_type)
    return head + _text(8, name) + _field(9, raw)


def _value_info(name: str, element_type: int, dims: Sequence[int | str]) -> bytes:
    shape = b"".join(
        _field(1, _varint_field(1, dim) if isinstance(dim, int) else _text(2, dim)) for dim in dims
    )
    tensor_type = _varint_field(1, element_type) + _field(2, shape)
    return _text(1, name) + _field(2, _field(1, tensor_type))


class Int8Scorer:
    """Exact int32 dot products of a uint8 query with int8 column blocks (ONNX Runtime)."""

    def __init__(self) -> None:
        import onnxruntime

        self._onnxruntime = onnxruntime
        self._session = self._open(int8_scores_model())
        # x86 kernels without VNNI add uint8 x int8 pairs in saturating int16: check that the
        # extremes are exact, else keep matrix values within 7 bits, where no pair saturates.
        self.levels = 127 if self._exact(127) else 63

    def _open(self, model: bytes) -> Any:
        options = self._onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return self._onnxruntime.InferenceSession(
            model, options, providers=["CPUExecutionProvider"]
        )

    def _exact(self, levels: int) -> bool:
        d = 512
        query = np.full((1, d), 255, dtype=np.uint8)  # 127 after the zero point
        block = np.full((d, 2), levels, dtype=np.int8)
        block[:, 1] = -levels
        expected = [127 * levels * d, -127 * levels * d]
        packed = self.pack(block)
        return bool(
            self.dots(query, block).tolist() == expected and packed.dots(query).tolist() == expected
        )

    def dots(self, query: np.ndarray, block: np.ndarray) -> np.ndarray:
        """int32 [n]: (query - 128) . block[:, j] for each column j."""
        (out,) = self._session.run(["dots"], {"query": query, "block": block})
        return np.asarray(out)[0]

    def pack(self, block: np.ndarray) -> PackedBlock:
        """A session with `block` as a prepacked constant (about 20 ms per 8192 columns)."""
        return PackedBlock(self._open(int8_scores_model(block)))


class PackedBlock:
    """One block's prepacked session: `dots(query)` as `Int8Scorer.dots(query, block)`."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def dots(self, query: np.ndarray) -> np.ndarray:
        (out,) = self._session.run(["dots"], {"query": query})
        return np.asarray(out)[0]


class SpeakerIndex:
    """Voiceprint rows by speaker id, with a model key per row; thread-safe.

    `version` is the store change number the contents reflect (kept by the caller). Call
    `close` to stop the background packing.
    """

    def __init__(
        self,
        mfcc_dim: int,
        *,
        block: int = 8192,
        int8_min_rows: int = 16384,
        int8: bool = True,
        pack_delay_s: float = 1.0,
    ) -> None:
        self.dim = GE2E_DIM + mfcc_dim
        self._block = block
        self._int8_min_rows = int8_min_rows
        self._pack_delay_s = pack_delay_s
        self._lock = threading.RLock()
        self._scorer: Int8Scorer | None = Int8Scorer() if int8 else None
        self._packer = ThreadPoolExecutor(1, thread_name_prefix="index-pack")
        self._packing: Future[None] | None = None
        self._tick = 0  # change counter of the int8 blocks, never reset
        self._reset()

    def _reset(self) -> None:
        self.version: int | None = None
        self._slot: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []
        self._rows = np.zeros((0, self.dim), dtype=np.float32)
        self._valid = np.zeros(0, dtype=bool)
        self._model = np.zeros(0, dtype=np.int32)
        self._codes: dict[Any, int] = {}
        self._count_by_code: dict[int, int] = {}
        self._scale = np.zeros(0, dtype=np.float32)
        self._half_l1 = np.zeros(0, dtype=np.float32)
        self._blocks: list[np.ndarray] = []  # [dim, block] int8 each
        self._packed: list[PackedBlock | None] = []
        self._changed_at: list[float] = []  # monotonic time of each block's last change
        self._changed_tick: list[int] = []

    def close(self) -> None:
        """Stop packing blocks in the background (the index stays usable)."""
        self._packer.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def updating(self) -> Iterator[None]:
        """Hold the index for a batch of changes: a search sees all of them or none."""
        with self._lock:
            yield

    def pack_now(self) -> None:
        """Pack every block at once (benchmarks and tests; the service packs in the background)."""
        while self._pack_one(delay_s=0.0):
            pass

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, speaker_id: object) -> bool:
        return speaker_id in self._slot

    def count(self, model_key: Any) -> int:
        """Rows with this model key."""
        code = self._codes.get(model_key)
        return 0 if code is None else self._count_by_code.get(code, 0)

    def clear(self) -> None:
        """Drop every row (and forget `version`)."""
        with self._lock:
            self._reset()

    def put(
        self, speaker_id: str, voiceprint: np.ndarray, mfcc: np.ndarray, model_key: Any
    ) -> None:
        """Add or replace a speaker's row (`voiceprint` and `mfcc` unit vectors)."""
        self.put_many([speaker_id], voiceprint[None, :], mfcc[None, :], [model_key])

    def put_many(
        self,
        speaker_ids: Sequence[str],
        voiceprints: np.ndarray,
        mfcc: np.ndarray,
        model_keys: Sequence[Any],
    ) -> None:
        """Add or replace many rows at once (a reload of 100,000 speakers takes about 1 s)."""
        rows = np.concatenate([voiceprints, mfcc], axis=1).astype(np.float32)
        if rows.shape != (len(speaker_ids), self.dim) or len(model_keys) != len(speaker_ids):
            raise ValueError(
                f"rows of {rows.shape} for {len(speaker_ids)} speakers, {self.dim} dims"
            )
        with self._lock:
            slots = np.empty(len(speaker_ids), dtype=np.int64)
            for i, (speaker_id, model_key) in enumerate(zip(speaker_ids, model_keys, strict=True)):
                code = self._codes.setdefault(model_key, len(self._codes))
                slot = self._slot.get(speaker_id)
                if slot is None:
                    slot = self._free.pop() if self._free else self._grow()
                    self._slot[speaker_id] = slot
                    self._ids[slot] = speaker_id
                else:
                    self._count_by_code[int(self._model[slot])] -= 1
                self._count_by_code[code] = self._count_by_code.get(code, 0) + 1
                self._model[slot] = code
                slots[i] = slot
            self._rows[slots] = rows
            self._valid[slots] = True
            if self._scorer is not None:
                self._quantise(slots, rows)

    def remove(self, speaker_id: str) -> bool:
        """Drop a speaker's row (zeroed, so nothing of the voiceprint stays in memory)."""
        with self._lock:
            slot = self._slot.pop(speaker_id, None)
            if slot is None:
                return False
            self._count_by_code[int(self._model[slot])] -= 1
            self._ids[slot] = None
            self._rows[slot] = 0.0
            self._valid[slot] = False
            if self._scorer is not None:
                block, column = divmod(slot, self._block)
                self._blocks[block][:, column] = 0
                self._touch([block])
            self._free.append(slot)
            return True

    def search(
        self,
        embedding: np.ndarray,
        mfcc: np.ndarray,
        ge2e_weight: float,
        mfcc_weight: float,
        k: int,
        model_key: Any,
    ) -> SearchResult:
        """The k rows of `model_key` with the largest `ge2e_weight * ge2e + mfcc_weight * mfcc`."""
        embedding = np.asarray(embedding, dtype=np.float32)
        mfcc = np.asarray(mfcc, dtype=np.float32)
        query = np.concatenate([ge2e_weight * embedding, mfcc_weight * mfcc]).astype(np.float32)
        with self._lock:
            n = len(self._ids)
            code = self._codes.get(model_key)
            compared = 0 if code is None else self._count_by_code.get(code, 0)
            stale = len(self._slot) - compared
            if compared == 0 or k <= 0:
                return SearchResult([], compared, stale, 0)
            k = min(k, compared)
            # None: every slot up to n holds a speaker of this model key (the common case).
            usable: np.ndarray | None = None
            if compared < n:
                usable = self._valid[:n]
                if len(self._count_by_code) > 1:
                    usable = usable & (self._model[:n] == code)
            if self._scorer is not None and n >= self._int8_min_rows:
                candidates = self._int8_candidates(query, usable, n, k)
                rows = self._rows[candidates]
            elif usable is None:
                candidates = np.arange(n)
                rows = self._rows[:n]  # a view: no copy of the whole matrix
            else:
                candidates = np.flatnonzero(usable)
                rows = self._rows[candidates]
            logits = rows @ query
            if len(candidates) > k:
                keep = np.argpartition(logits, len(logits) - k)[len(logits) - k :]
            else:
                keep = np.arange(len(candidates))
            kept = rows[keep].astype(np.float64)
            ids = [str(self._ids[int(candidates[i])]) for i in keep]
        # The cosines of the k kept rows, in float64 like Verify's, and their exact order.
        ge2e = np.clip(kept[:, :GE2E_DIM] @ embedding.astype(np.float64), -1.0, 1.0)
        mfcc_cosine = np.clip(kept[:, GE2E_DIM:] @ mfcc.astype(np.float64), -1.0, 1.0)
        exact = ge2e_weight * ge2e + mfcc_weight * mfcc_cosine
        matches = sorted(
            (
                Match(speaker_id=ids[i], logit=float(exact[i]), ge2e=float(g), mfcc=float(m))
                for i, (g, m) in enumerate(zip(ge2e, mfcc_cosine, strict=True))
            ),
            key=lambda match: -match.logit,
        )
        if self._scorer is not None and n >= self._int8_min_rows:
            self._pack_later()
        return SearchResult(matches, compared, stale, len(candidates))

    # -------------------------------------------------------------- internals

    def _grow(self) -> int:
        """A new slot at the end, growing the arrays (doubling) and the int8 blocks."""
        slot = len(self._ids)
        self._ids.append(None)
        if slot >= len(self._rows):
            capacity = max(1024, 2 * len(self._rows))
            self._rows = _resized(self._rows, capacity)
            self._valid = _resized(self._valid, capacity)
            self._model = _resized(self._model, capacity)
            self._scale = _resized(self._scale, capacity)
            self._half_l1 = _resized(self._half_l1, capacity)
        if self._scorer is not None and slot >= len(self._blocks) * self._block:
            self._blocks.append(np.zeros((self.dim, self._block), dtype=np.int8))
            self._packed.append(None)
            self._changed_at.append(time.monotonic())
            self._changed_tick.append(self._tick)
        return slot

    def _touch(self, blocks: Sequence[int]) -> None:
        """Blocks whose int8 data changed: their packed sessions are out of date."""
        now = time.monotonic()
        for block in blocks:
            self._tick += 1
            self._packed[block] = None
            self._changed_at[block] = now
            self._changed_tick[block] = self._tick

    def _quantise(self, slots: np.ndarray, rows: np.ndarray) -> None:
        assert self._scorer is not None
        levels = self._scorer.levels
        peaks = np.abs(rows).max(axis=1)
        scales = np.where(peaks > 0, peaks / levels, 1.0).astype(np.float32)
        quantised = np.clip(np.rint(rows / scales[:, None]), -levels, levels).astype(np.int8)
        blocks, columns = np.divmod(slots, self._block)
        for block in np.unique(blocks):
            mine = blocks == block
            self._blocks[int(block)][:, columns[mine]] = quantised[mine].T
        self._touch([int(b) for b in np.unique(blocks)])
        self._scale[slots] = scales
        self._half_l1[slots] = 0.5 * np.abs(quantised.astype(np.int32)).sum(axis=1)

    def _int8_candidates(
        self, query: np.ndarray, usable: np.ndarray | None, n: int, k: int
    ) -> np.ndarray:
        """Rows that may be in the top k: the int8 pass and its error bound (module doc)."""
        assert self._scorer is not None
        peak = float(np.abs(query).max())
        query_scale = peak / 127.0 if peak > 0 else 1.0
        quantised = np.clip(np.rint(query / query_scale), -127, 127).astype(np.int32)
        as_uint8 = (quantised + 128).astype(np.uint8)[None, :]
        scorer = self._scorer
        parts = []
        for block in range(-(-n // self._block)):
            packed = self._packed[block]
            if packed is not None:
                parts.append(packed.dots(as_uint8))
            else:
                parts.append(scorer.dots(as_uint8, self._blocks[block]))
        dots = np.concatenate(parts)[:n]
        scale = self._scale[:n] * np.float32(query_scale)
        approx = dots.astype(np.float32) * scale
        query_term = np.float32(0.5 * np.abs(quantised).sum() + 0.25 * self.dim)
        # + float32 rounding of both the approximation and the float32 rescoring
        bound = scale * (self._half_l1[:n] + query_term) + np.float32(1e-4) * (
            np.abs(approx) + np.float32(1.0)
        )
        lower = approx - bound
        if usable is not None:
            lower[~usable] = -np.inf
        kth_lower = np.partition(lower, n - k)[n - k]
        reach = approx + bound >= kth_lower
        return np.flatnonzero(reach if usable is None else reach & usable)

    def _pack_later(self) -> None:
        """Start packing stale blocks in the background, unless that is under way."""
        with self._lock:
            if self._packing is not None and not self._packing.done():
                return
            if not any(p is None for p in self._packed):
                return
            try:
                self._packing = self._packer.submit(self._pack_stale)
            except RuntimeError:  # closed
                self._packing = None

    def _pack_stale(self) -> None:
        while self._pack_one(delay_s=self._pack_delay_s):
            pass

    def _pack_one(self, delay_s: float) -> bool:
        """Pack one block unchanged for `delay_s`; False when none is left to pack."""
        assert self._scorer is not None
        now = time.monotonic()
        with self._lock:
            todo = [
                b
                for b, packed in enumerate(self._packed)
                if packed is None and now - self._changed_at[b] >= delay_s
            ]
            if not todo:
                return False
            block = todo[0]
            tick = self._changed_tick[block]
            data = self._blocks[block].copy()
            blocks = self._blocks
        packed = self._scorer.pack(data)  # the slow part, outside the lock
        with self._lock:
            # Install only if the block is still the one copied (not changed, not cleared).
            if self._blocks is blocks and self._changed_tick[block] == tick:
                self._packed[block] = packed
        return True


def _resized(array: np.ndarray, capacity: int) -> np.ndarray:
    grown = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[: len(array)] = array
    return grown
