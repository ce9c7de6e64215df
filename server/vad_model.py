"""Silero VAD through Triton: one speech probability per 32 ms frame, state carried by the caller.

The Triton model (`silero_vad`, built by export/vad.py) takes one stream's window of W frames
[1, W, 576] and its LSTM state [1, 2, 128], and returns W probabilities and the state after the
window. This client cuts audio into frames (each frame is 512 new samples after the previous
frame's last 64), sends consecutive windows of `window_frames` frames one after the other
(each window needs the state the previous one left), and hands the caller a `VadState` to pass
into its next call, so a stream can arrive in pieces. Concurrent streams' windows of the same
length are merged into one run by Triton's dynamic batcher; a stream's probabilities do not
depend on what it was batched with (checked at export and in tests/test_vad_model.py).

The probabilities equal those of silero's own per-chunk model (`silero_vad.onnx`, the package's
`OnnxWrapper`) run over the same audio from its start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.deadlines import deadline_after, time_left
from server.vad import FRAME_SAMPLES, SAMPLE_RATE

if TYPE_CHECKING:
    from server.triton_client import TritonClient

# The Triton model's name and interface, shared with its export (export/vad.py,
# export/triton_config.py).
MODEL_NAME = "silero_vad"
CONTEXT_SAMPLES = 64
FRAME_WIDTH = CONTEXT_SAMPLES + FRAME_SAMPLES  # 576
HIDDEN = 128
FRAMES_INPUT, STATE_INPUT = "frames", "state"
PROBS_OUTPUT, STATE_OUTPUT = "probabilities", "state_out"
# Frames per Triton request at most: 64 frames = 2.048 s of audio. Measured with
# benchmarks/vad_model.py (benchmarks/README.md, "Silero VAD"): a request costs ~1 ms of CPU,
# a frame ~60 us, so 64 frames bring the CPU per frame to 1.5x the in-process model's (32: 1.7x,
# 128: 1.4x, 1 frame per request: 16x); longer windows save little more, hold the one model
# instance longer (head-of-line blocking for other streams) and leave longer odd-sized
# remainders, which Triton cannot batch with other streams' windows.
DEFAULT_WINDOW_FRAMES = 64
# Frames per request when a whole recording is at hand (Embed, Verify, DetectSpeech): 512
# frames = 16.4 s, so a typical utterance takes one request instead of one per 2 s. The
# probabilities do not depend on the window (checked bit for bit at export, and by
# tests/test_vad_model.py), so StreamingEmbed's 64-frame windows still give Embed's numbers.
# A 512-frame window holds the model instance ~30 ms, the most a stream's window waits behind it.
RECORDING_WINDOW_FRAMES = 512


@dataclass(frozen=True)
class VadState:
    """Where a stream stands between calls: the previous frame's tail and the LSTM's h and c.

    Arrays are float32 copies, made read-only, so a state can be kept and reused safely.
    """

    context: np.ndarray  # (64,) float32, last samples of the previous frame
    recurrent: np.ndarray  # (2, 128) float32: h and c of the LSTM

    def __post_init__(self) -> None:
        for name, shape in (("context", (CONTEXT_SAMPLES,)), ("recurrent", (2, HIDDEN))):
            array = np.array(getattr(self, name), dtype=np.float32)  # a copy
            if array.shape != shape:
                raise ValueError(f"VadState.{name} must have shape {shape}, got {array.shape}")
            array.setflags(write=False)
            object.__setattr__(self, name, array)

    @classmethod
    def initial(cls) -> VadState:
        """The state at the start of a stream: silence before it, a zero LSTM state."""
        return cls(np.zeros(CONTEXT_SAMPLES, np.float32), np.zeros((2, HIDDEN), np.float32))


def frames_of(samples: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
    """[n, 576] frames of `samples` (length n * 512), each preceded by the 64 samples before it
    (`context` before the first; None: zeros, the start of a stream)."""
    if len(samples) % FRAME_SAMPLES:
        raise ValueError(f"sample count {len(samples)} is not a multiple of {FRAME_SAMPLES}")
    if context is None:
        context = np.zeros(CONTEXT_SAMPLES, np.float32)
    padded = np.concatenate([context, samples]).astype(np.float32, copy=False)
    n = len(samples) // FRAME_SAMPLES
    view = np.lib.stride_tricks.sliding_window_view(padded, FRAME_WIDTH)
    return np.ascontiguousarray(view[: n * FRAME_SAMPLES : FRAME_SAMPLES])


def windowed_probabilities(session: Any, samples: np.ndarray, window_frames: int) -> np.ndarray:
    """The Triton model's probabilities for one stream from its start, run in process: an ONNX
    Runtime `session` of its model.onnx, `window_frames` frames per run, state carried, as
    `TritonVad` sends them (offline tools: calibration, the export's checks)."""
    frames = frames_of(samples)
    state = np.zeros((1, 2, HIDDEN), np.float32)
    probs = []
    for start in range(0, len(frames), window_frames):
        out, state = session.run(
            [PROBS_OUTPUT, STATE_OUTPUT],
            {FRAMES_INPUT: frames[None, start : start + window_frames], STATE_INPUT: state},
        )
        probs.append(out[0])
    return np.concatenate(probs) if probs else np.zeros(0, np.float32)


class OnnxVad:
    """The exported VAD (`model_repository/silero_vad/1/model.onnx`) run in process with ONNX
    Runtime, for offline tools that must trim as the service does (`voicegate calibrate`)."""

    def __init__(
        self, model_path: Path, window_frames: int = DEFAULT_WINDOW_FRAMES, threads: int = 1
    ) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.window_frames = window_frames

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        """One probability per 512-sample frame of `samples` (a multiple of 512 long)."""
        return windowed_probabilities(self.session, samples, self.window_frames)


class TritonVad:
    """Speech probabilities from the Triton model `model`, `window_frames` frames per request."""

    window_frames: int  # frames per request: callers cut their audio into the same windows

    def __init__(
        self,
        client: TritonClient,
        model: str = MODEL_NAME,
        window_frames: int = DEFAULT_WINDOW_FRAMES,
    ) -> None:
        if window_frames < 1:
            raise ValueError("window_frames must be at least 1")
        self.client = client
        self.model = model
        self.window_frames = window_frames

    async def probabilities(
        self,
        samples: np.ndarray,
        state: VadState | None = None,
        timeout_s: float | None = None,
        window_frames: int | None = None,
    ) -> tuple[np.ndarray, VadState]:
        """One speech probability per 512-sample frame of `samples` (16 kHz float32, length a
        multiple of 512; the caller buffers the remainder). `state` carries across calls;
        `window_frames`: frames per Triton request (default `self.window_frames`).

        Returns float32 [len(samples) // 512] probabilities and the state to pass next time
        (None: the start of a stream). `timeout_s` bounds the whole call (default: the client's
        timeout for each Triton request). Raises ValueError for malformed samples, and the
        TritonClient's errors (BackendUnavailable, DeadlineExceeded) when Triton fails.
        """
        samples = np.asarray(samples)
        if samples.ndim != 1:
            raise ValueError(f"samples must be one-dimensional (mono), got shape {samples.shape}")
        if len(samples) % FRAME_SAMPLES:
            raise ValueError(
                f"sample count {len(samples)} is not a multiple of {FRAME_SAMPLES}; "
                "buffer the remainder for the next call"
            )
        samples = samples.astype(np.float32, copy=False)
        state = state or VadState.initial()
        if len(samples) == 0:
            return np.zeros(0, np.float32), state
        recurrent = np.ascontiguousarray(state.recurrent[None])
        context = state.context
        deadline = deadline_after(timeout_s)
        window_samples = (window_frames or self.window_frames) * FRAME_SAMPLES
        parts = []
        # Sequential on purpose: each window starts from the state the previous one left. The
        # frames are built one window at a time, so a long recording never has all its frames
        # (576 floats per 512 samples) in memory at once.
        for start in range(0, len(samples), window_samples):
            chunk = samples[start : start + window_samples]
            window = frames_of(chunk, context)[None]
            context = chunk[-CONTEXT_SAMPLES:]
            result = await self.client.infer(
                self.model,
                {FRAMES_INPUT: window, STATE_INPUT: recurrent},
                [PROBS_OUTPUT, STATE_OUTPUT],
                timeout_s=time_left(deadline),
            )
            probs, recurrent = result[PROBS_OUTPUT], result[STATE_OUTPUT]
            if probs.shape != (1, window.shape[1]) or recurrent.shape != (1, 2, HIDDEN):
                raise RuntimeError(
                    f"Triton model {self.model!r} returned shapes {probs.shape} and "
                    f"{recurrent.shape} for a window of {window.shape[1]} frames"
                )
            parts.append(probs[0])
        next_state = VadState(samples[-CONTEXT_SAMPLES:], recurrent[0])
        return np.concatenate(parts).astype(np.float32, copy=False), next_state


__all__ = [
    "CONTEXT_SAMPLES",
    "FRAME_SAMPLES",
    "MODEL_NAME",
    "RECORDING_WINDOW_FRAMES",
    "SAMPLE_RATE",
    "OnnxVad",
    "TritonVad",
    "VadState",
    "frames_of",
    "windowed_probabilities",
]
