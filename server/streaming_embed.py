"""StreamingEmbed: Embed's pipeline run on raw audio as it arrives, chunk by chunk.

One `StreamingEmbedSession` per call holds the state between chunks; its methods are
synchronous (they run on the preprocessing threads) and the core drives it
(`SpeakerCore.embed_stream`): decode each chunk, send whole VAD windows to Triton, turn the
segments the VAD has decided into speech, the speech into mel frames, and cut each partial
window as soon as it is certain; the core sends cut windows to the encoder in groups as the
stream goes and keeps only the running sum of their embeddings.

What equals Embed, and why (tested: the embeddings are bit-identical, both trims):

- decoding (`vad_core.RawStreamDecoder`, shared with StreamingDetectSpeech): raw samples may
  be split anywhere (even inside a sample); whole frames are decoded as `audio.decode_raw`
  does (same scaling, downmix, clipping), and `soxr.ResampleStream` gives the same samples as
  the one-shot resampling (bit-identical).
- trim "energy" needs the whole recording (below), so the stream keeps the decoded audio and
  runs Embed's own code on it at the end.
- trim "vad": Embed itself runs this module's code on the whole recording (`vad_features`),
  so there is one computation, fed in different pieces, and each step is made independent
  of how the audio was cut: the VAD probabilities do not depend on the Triton request's
  window (bit for bit; Embed sends 512 frames at a time, a stream 64, vad_model.py), and the
  features are fed in the stream's 64-frame windows in both; `vad.StreamingSegmenter` reports
  each boundary as soon as it is certain and ends with exactly `vad.speech_segments`; the
  mel frames are computed in fixed blocks of
  64 frames aligned to the start (`IncrementalMel`), the loudness energies per 160-sample
  block (`features.hop_energies`); each partial window's gain comes from its own samples
  (`features.normalised_partial`), so it is known once the window is; the encoder is
  batch-invariant (export/int8_invariant.py), so windows sent in groups get the embeddings
  they get in Embed's one request; and `features.EmbeddingMean` sums them in order.

Memory of one stream, trim "vad", bounded by the chunk and the partial window, not the
recording: the chunk being decoded, the VAD window not yet sent (`window_frames` x 512
samples), the audio of speech not yet decided (from the start of a possible segment, ~0.3 s,
or the silence that may still end one, ~0.15 s), the mel frames and block energies from the
next partial window's start (at most a window and an STFT block, ~46 KB), and the windows
cut but not yet encoded (`core.STREAM_ENCODE_PARTIALS` at most, 25.6 KB each). Trim "energy"
cuts at 40 dB below the loudest 30 ms of the whole recording, which cannot be known before
the end: the session keeps the decoded 16 kHz audio (64 KB per second, 115 MB at
`max_stream_seconds`, 1800 s) and runs Embed's own code on it at the end.
"""

from __future__ import annotations

import math
import weakref

import numpy as np

from server.audio import SAMPLE_RATE
from server.config import Settings
from server.features import (
    HOP,
    N_FFT,
    PARTIAL_FRAMES,
    PARTIAL_STEP,
    hop_energies,
    normalised_partial,
    partial_slices,
    power_mel,
)
from server.vad import (
    FRAME_SAMPLES,
    EventKind,
    Segment,
    SpeechEvent,
    StreamingSegmenter,
    VadParams,
    pad_to_frames,
)
from server.vad_core import RawStreamDecoder, StreamSpec
from server.vad_model import VadState

# Every live session, for tests and diagnostics: a cancelled call must leave none behind.
_LIVE: weakref.WeakSet[StreamingEmbedSession] = weakref.WeakSet()


def live_sessions() -> int:
    """Sessions not yet garbage-collected (collect first for an exact count)."""
    return len(_LIVE)


class IncrementalMel:
    """`features.power_mel` of a signal that arrives in pieces. Frame t covers samples
    [t*HOP - N_FFT/2, t*HOP + N_FFT/2) of the signal zero-padded at both ends, as librosa's
    centred STFT has it.

    Frames are computed in fixed blocks of BLOCK_FRAMES, aligned to frame 0, as soon as a
    block's samples are there: the arithmetic (FFT and mel product shapes) is then the same
    however the signal was cut, so the frames are bit for bit those of one piece. Blocks the
    caller no longer needs are dropped (`drop_before`).
    """

    BLOCK_FRAMES = 64
    BLOCK_SAMPLES = (BLOCK_FRAMES - 1) * HOP + N_FFT  # samples one block of frames covers

    def __init__(self) -> None:
        self._buffer = np.zeros(N_FFT // 2, dtype=np.float32)  # the centring's zeros
        self._blocks: list[np.ndarray] = []
        self._first = 0  # frame number of the first kept block's first frame
        self.frames = 0  # frames computed so far

    @property
    def nbytes(self) -> int:
        return self._buffer.nbytes + sum(block.nbytes for block in self._blocks)

    def feed(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        buffer = np.concatenate([self._buffer, samples.astype(np.float32, copy=False)])
        step = self.BLOCK_FRAMES * HOP
        count = (len(buffer) - self.BLOCK_SAMPLES) // step + 1
        for block in range(max(0, count)):
            start = block * step
            self._blocks.append(power_mel(buffer[start : start + self.BLOCK_SAMPLES], False))
        if count > 0:
            self.frames += count * self.BLOCK_FRAMES
            buffer = buffer[count * step :]
        self._buffer = buffer.copy()  # < one block; not a view into the concatenation

    def pad_to(self, n_frames: int) -> None:
        """Follow the signal with zeros until `n_frames` frames are computed."""
        if n_frames > self.frames:
            blocks = -(-(n_frames - self.frames) // self.BLOCK_FRAMES)
            self.feed(np.zeros(blocks * self.BLOCK_FRAMES * HOP, np.float32))

    def window(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        """Kept frames covering [start, stop) and the frame number of their first row."""
        if start < self._first or stop > self.frames:
            raise RuntimeError(f"mel frames {start}..{stop} are not held ({self._first}..)")
        first = (start - self._first) // self.BLOCK_FRAMES
        last = -(-(stop - self._first) // self.BLOCK_FRAMES)
        frames = np.concatenate(self._blocks[first:last])
        return frames, self._first + first * self.BLOCK_FRAMES

    def drop_before(self, frame: int) -> None:
        """Let go of the blocks that end at or before `frame`."""
        whole = (frame - self._first) // self.BLOCK_FRAMES
        if whole > 0:
            del self._blocks[:whole]
            self._first += whole * self.BLOCK_FRAMES


class PartialCutter:
    """`features.partial_windows` of speech that arrives in pieces, each window cut as soon as
    it is certain: once the speech covers a window's 1.6 s, the window belongs to the utterance
    whatever follows, and its loudness gain (`features.normalised_partial`) is known. Only the
    mel frames and block energies from the next window's start are kept, at most one window
    plus an STFT block (~46 KB), and the windows cut but not yet taken (`take`).
    """

    def __init__(self) -> None:
        self.mel = IncrementalMel()
        self._energies = np.zeros(0, np.float64)  # per HOP block, from frame _energies_first
        self._energies_first = 0
        self._tail = np.zeros(0, np.float32)  # samples after the last whole HOP block
        self.samples = 0
        self.cut = 0  # windows cut so far
        self._ready: list[np.ndarray] = []

    @property
    def nbytes(self) -> int:
        ready = sum(partial.nbytes for partial in self._ready)
        return self.mel.nbytes + self._energies.nbytes + self._tail.nbytes + ready

    @property
    def ready(self) -> int:
        """Windows cut and not yet taken."""
        return len(self._ready)

    def feed(self, speech: np.ndarray) -> None:
        if not len(speech):
            return
        self.samples += len(speech)
        self.mel.feed(speech)
        tail = np.concatenate([self._tail, speech.astype(np.float32, copy=False)])
        whole = len(tail) // HOP * HOP
        self._energies = np.concatenate([self._energies, hop_energies(tail[:whole])])
        self._tail = tail[whole:].copy()
        self._cut_certain()

    def take(self) -> list[np.ndarray]:
        """The windows cut since the last call, in order, each [160, 40] float32."""
        ready, self._ready = self._ready, []
        return ready

    def finish(self) -> list[np.ndarray]:
        """At the end of the speech: the windows not yet taken, the last ones cut by the
        utterance's length (zero-padded), as `features.partial_windows` cuts them."""
        remaining = partial_slices(self.samples)[self.cut :]
        if remaining:
            self.mel.pad_to(remaining[-1].stop)
            if len(self._tail):
                self._energies = np.concatenate([self._energies, hop_energies(self._tail)])
                self._tail = self._tail[:0]
        for window in remaining:
            self._ready.append(self._window(window))
            self.cut += 1
        return self.take()

    def _cut_certain(self) -> None:
        while True:
            start = self.cut * PARTIAL_STEP
            stop = start + PARTIAL_FRAMES
            if self.mel.frames < stop or self.samples < stop * HOP:
                break
            self._ready.append(self._window(slice(start, stop)))
            self.cut += 1
        next_start = self.cut * PARTIAL_STEP
        self.mel.drop_before(next_start)
        if next_start > self._energies_first:
            self._energies = self._energies[next_start - self._energies_first :].copy()
            self._energies_first = next_start

    def _window(self, window: slice) -> np.ndarray:
        frames, first = self.mel.window(window.start, window.stop)
        offset = self._energies_first
        energies = self._energies[window.start - offset : window.stop - offset]
        partial = frames[window.start - first : window.stop - first]
        return normalised_partial(partial, energies, window, self.samples)


class VadSpeechFeatures:
    """Trim "vad" features of audio that arrives in pieces: 16 kHz samples in (`add`), whole
    VAD windows out (`window`), their probabilities in (`accept`); the speech the VAD has
    decided goes to the `PartialCutter` at once, which cuts each partial window as soon as it
    is certain (`take_partials`), and the last ones at the end (`final_partials`).

    Audio is kept from the first sample that may still belong to a segment (or has not been
    sent to the VAD yet); everything before it is dropped. Embed runs the same code on the
    whole recording (`vad_features`), so the two agree bit for bit.
    """

    def __init__(self, params: VadParams, window_frames: int) -> None:
        self._params = params
        self._segmenter = StreamingSegmenter(params)
        self._window = max(1, window_frames) * FRAME_SAMPLES
        self._pad = math.ceil(params.speech_pad_ms * SAMPLE_RATE / 1000)
        self.cutter = PartialCutter()
        self._audio = np.zeros(0, dtype=np.float32)
        self._audio_start = 0  # stream index of _audio[0]
        self.received = 0  # 16 kHz samples decoded so far
        self._sent = 0  # samples sent to the VAD
        self._open: int | None = None  # while a segment is open: speech emitted up to here
        self._last_end = 0
        self.speech_samples = 0
        self.state: VadState | None = None  # the VAD's state, carried between windows
        self.segments: list[Segment] = []  # all of them, after the last window
        self._finished = False

    @property
    def nbytes(self) -> int:
        return self._audio.nbytes + self.cutter.nbytes

    def add(self, samples: np.ndarray) -> None:
        if len(samples):
            self._audio = np.concatenate([self._audio, samples])
            self.received += len(samples)

    def window(self, final: bool) -> tuple[np.ndarray, int] | None:
        """The next samples for the VAD and how many of them are audio (the rest is the zero
        padding of the last frame): whole windows, or at the end all that is left."""
        available = self.received - self._sent
        if not final:
            count = available // self._window * self._window
            if count == 0:
                return None
            return self._slice(self._sent, self._sent + count), count
        return pad_to_frames(self._slice(self._sent, self.received)), available

    def accept(
        self, probabilities: np.ndarray, count: int, state: VadState | None, final: bool
    ) -> None:
        """The VAD's probabilities for the samples of `window` (`count` of them audio)."""
        self._sent += count
        self.state = state
        self._finished = final
        probabilities = np.asarray(probabilities, dtype=np.float32).reshape(-1)
        if not final:
            self._handle(self._segmenter.push(probabilities))
        else:
            whole = count // FRAME_SAMPLES
            events = self._segmenter.push(probabilities[:whole])
            tail, self.segments = self._segmenter.finish(self.received, probabilities[whole:])
            self._handle(events + tail)
        self._drop_decided()

    def _handle(self, events: list[SpeechEvent]) -> None:
        for event in events:
            if event.kind is EventKind.SPEECH_START:
                self._open = event.sample
            else:
                assert self._open is not None
                self._speech(self._open, event.sample)
                self._last_end = event.sample
                self._open = None
        if self._open is not None:  # the part of the open segment that is certainly speech
            floor = self._certain_speech_until()
            if floor > self._open:
                self._speech(self._open, floor)
                self._open = floor

    def _speech(self, start: int, end: int) -> None:
        samples = self._slice(start, end)
        self.speech_samples += len(samples)
        self.cutter.feed(samples)

    def take_partials(self) -> list[np.ndarray]:
        """The partial windows cut since the last call (`PartialCutter.take`)."""
        return self.cutter.take()

    def final_partials(self) -> list[np.ndarray]:
        """After the last window: the partial windows not yet taken."""
        assert self._finished
        return self.cutter.finish()

    def partials(self) -> np.ndarray:
        """After the last window, when none were taken: all the partial windows, [n, 160, 40]."""
        assert self.cutter.cut == self.cutter.ready
        return np.stack(self.final_partials())

    def _certain_speech_until(self) -> int:
        """While a reported segment has no reported end: the samples before the returned index
        are surely inside it (its padded end lies at or after its unpadded end, and that lies
        at or after the first frame of a silence that has not yet lasted long enough).
        """
        assert self._open is not None
        detector = self._segmenter.detector
        reported = self._segmenter.reported_starts - 1  # the open segment's index
        if reported < len(detector.kept):
            return max(self._open, detector.kept[reported][1])
        if not math.isinf(self._params.max_speech_s):
            return self._open  # a cut at max_speech_s may fall back to an earlier silence
        if detector.temp_end:
            return max(self._open, detector.temp_end)
        return max(self._open, detector.frames * FRAME_SAMPLES)

    def _next_start_floor(self) -> int:
        """No segment open: the earliest sample a later segment may start at (padded)."""
        detector = self._segmenter.detector
        start = detector.start if detector.start is not None else detector.frames * FRAME_SAMPLES
        return max(self._last_end, start - self._pad - 1)

    def _drop_decided(self) -> None:
        keep = self._open if self._open is not None else self._next_start_floor()
        keep = min(keep, self._sent)
        if keep > self._audio_start:
            self._audio = self._audio[keep - self._audio_start :].copy()
            self._audio_start = keep

    def _slice(self, start: int, end: int) -> np.ndarray:
        if start < self._audio_start:
            raise RuntimeError(f"stream audio from {start} was dropped (kept {self._audio_start})")
        return self._audio[start - self._audio_start : end - self._audio_start]


class StreamingEmbedSession:
    """The state of one StreamingEmbed call between chunks (see the module docstring).

    Synchronous: the caller runs each method on a worker thread, one at a time.
    """

    def __init__(
        self,
        spec: StreamSpec,
        settings: Settings,
        *,
        vad_params: VadParams,
        vad_window_frames: int,
    ) -> None:
        """`vad_params`, `vad_window_frames` (trim "vad"): the segment rules and the VAD
        client's frames per request (its `window_frames`), so that the stream's requests are
        those of Embed for the whole recording (server/vad_model.py)."""
        self.decoder = RawStreamDecoder(spec, settings)  # checks the spec
        self.decoded_samples = 0
        self._audio: list[np.ndarray] = []  # trim "energy" only
        self._audio_bytes = 0
        self.vad: VadSpeechFeatures | None = None
        if settings.trim == "vad":  # else "energy" (Settings checks the value)
            self.vad = VadSpeechFeatures(vad_params, vad_window_frames)
        self._ended = False
        _LIVE.add(self)

    @property
    def nbytes(self) -> int:
        """Bytes of audio and features the session holds now (not counting numpy overheads)."""
        return self._audio_bytes + (self.vad.nbytes if self.vad is not None else 0)

    @property
    def decoded_seconds(self) -> float:
        return self.decoded_samples / SAMPLE_RATE

    def feed(self, chunk: bytes) -> None:
        """Decode one chunk (any number of bytes)."""
        self._add(self.decoder.feed(chunk))

    def end(self) -> None:
        """The caller half-closed the stream: decode what the resampler still holds."""
        self._add(self.decoder.finish())
        self._ended = True

    def vad_window(self, final: bool) -> tuple[np.ndarray, int] | None:
        """Samples to send to the VAD next (`VadSpeechFeatures.window`); None: wait for more."""
        assert self.vad is not None
        return self.vad.window(final)

    def vad_state(self) -> VadState | None:
        assert self.vad is not None
        return self.vad.state

    def accept_probabilities(
        self, probabilities: np.ndarray, count: int, state: VadState, final: bool
    ) -> None:
        assert self.vad is not None
        self.vad.accept(probabilities, count, state, final)

    def audio(self) -> np.ndarray:
        """Trim "energy": the whole decoded 16 kHz recording (the session lets go of it)."""
        wav = np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32)
        self._audio, self._audio_bytes = [], 0
        return wav

    @property
    def speech_samples(self) -> int:
        assert self.vad is not None
        return self.vad.speech_samples

    def ready_partials(self) -> int:
        """Trim "vad": partial windows cut and not yet taken."""
        assert self.vad is not None
        return self.vad.cutter.ready

    def take_partials(self) -> list[np.ndarray]:
        """Trim "vad": the partial windows cut since the last call, loudness-normalised."""
        assert self.vad is not None
        return self.vad.take_partials()

    def final_partials(self) -> list[np.ndarray]:
        """Trim "vad", after the last window: the partial windows not yet taken."""
        assert self._ended and self.vad is not None
        return self.vad.final_partials()

    def _add(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        self.decoded_samples += len(samples)
        if self.vad is not None:
            self.vad.add(samples)
        else:
            self._audio.append(samples)
            self._audio_bytes += samples.nbytes


def vad_features(
    wav: np.ndarray, probabilities: np.ndarray, params: VadParams, window_frames: int
) -> VadSpeechFeatures:
    """Embed's trim "vad": the features of a whole 16 kHz recording whose VAD probabilities
    (one per 512 samples, the last frame zero-padded) are known, computed window by window
    exactly as a stream's are."""
    features = VadSpeechFeatures(params, window_frames)
    features.add(wav)
    frames = 0
    while True:
        window = features.window(final=False)
        final = window is None
        if window is None:
            window = features.window(final=True)
            assert window is not None  # at the end there is always one, maybe empty
        samples, count = window
        step = len(samples) // FRAME_SAMPLES
        features.accept(probabilities[frames : frames + step], count, None, final)
        frames += step
        if final:
            return features


__all__ = [
    "IncrementalMel",
    "PartialCutter",
    "StreamingEmbedSession",
    "VadSpeechFeatures",
    "live_sessions",
    "vad_features",
]
