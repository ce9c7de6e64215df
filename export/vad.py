"""Silero VAD as a batched, state-carrying Triton model, built from the silero-vad wheel's ONNX.

The wheel's `silero_vad_16k_sequence.onnx` runs one stream: frames [T, 576] plus the LSTM's h and
c [1, 1, 128] → one speech probability per frame. Triton wants a batch axis first on every
input, and its dynamic batcher should put windows of several streams into one run, so the
graph is rewired (no weights change):

    frames [B, W, 576] ──reshape──> [B*W, 576] ── STFT conv, 4 encoder convs (per frame) ──>
    [B*W, 128, 1] ──reshape──> [B, W, 128] ──transpose──> [W, B, 128] ── LSTM (batch B) ──>
    output conv, sigmoid ──> probabilities [B, W]
    state [B, 2, 128] (h, c) ──> LSTM initial state;  final h, c ──> state_out [B, 2, 128]

A frame is 512 new samples at 16 kHz preceded by the previous frame's last 64 (zeros at the
start of a stream); the caller carries `state_out` into its next window. Graph surgery rather
than a torch re-export: the sequence graph is already clean, and surgery keeps the wheel's
exact weights and operators, so the result stays bit-comparable with the package's models.

`build_and_validate` checks the rewired model against the wheel's per-chunk `silero_vad.onnx`
run frame by frame (on real speech when there is some, and on noise), windowed with the state
carried, and for batch invariance; any failure is an ExportError that fails the export.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.onnx_export import session
from server.errors import ExportError

# The served model's name, frame layout and tensor names: one definition, in its client.
from server.vad_model import (
    FRAME_SAMPLES,
    FRAME_WIDTH,
    FRAMES_INPUT,
    HIDDEN,
    MODEL_NAME,
    PROBS_OUTPUT,
    SAMPLE_RATE,
    STATE_INPUT,
    STATE_OUTPUT,
    frames_of,
    windowed_probabilities,
)

if TYPE_CHECKING:
    import onnx
    import onnxruntime

log = logging.getLogger("voicegate.export")

# Limits of the export's checks. The rewired graph runs the same operators as the per-chunk
# model, so the difference is float rounding only (measured ~1e-7); a wiring mistake (wrong
# frame order, state not carried, batch rows mixed) shows up as 1e-2 or more.
MAX_ABS_DIFF_VS_PER_CHUNK = 1e-5
MAX_BATCH_DEPENDENCE = 1e-6
# Windows used by the checks: odd sizes too, so a last, shorter window is covered.
CHECK_WINDOWS = (1, 7, 32, 64)
CHECK_BATCH = 8
# Real speech for the check: the first few dev recordings, at most this many seconds each.
CHECK_RECORDINGS = 4
CHECK_SECONDS = 20.0


def package_data_dir() -> Path:
    """The silero-vad wheel's `data/` folder, found without importing the package.

    (`import silero_vad` imports torch and sets its thread count for the whole process.)
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the silero-vad package is not installed (pip install silero-vad==6.2.3)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def sequence_model_path() -> Path:
    return package_data_dir() / "silero_vad_16k_sequence.onnx"


def per_chunk_model_path() -> Path:
    return package_data_dir() / "silero_vad.onnx"


def build_window_model(sequence: Path | None = None) -> onnx.ModelProto:
    """The batched window model, rewired from the wheel's 16 kHz sequence model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(sequence or sequence_model_path()))
    graph = model.graph
    names = [node.output[0] for node in graph.node]
    # The exact graph this surgery was written for (silero-vad 6.2.3); refuse any other.
    expected = {
        "/Transpose_output_0": ("Transpose", "/Relu_3_output_0"),
        "speech_probs": ("Reshape", "/Sigmoid_output_0"),
    }
    by_output = {node.output[0]: node for node in graph.node}
    for output, (op, source) in expected.items():
        node = by_output.get(output)
        if node is None or node.op_type != op or node.input[0] != source:
            raise ExportError(
                f"unexpected silero sequence graph at {output!r}: update export/vad.py"
            )
    if [i.name for i in graph.input] != ["input", "h", "c"] or "hn" not in by_output[
        "/recurrent/LSTM_output_0"
    ].output:
        raise ExportError("unexpected silero sequence model inputs/outputs: update export/vad.py")

    def const(name: str, values: Sequence[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    head = [
        # [B, W, 576] -> [B*W, 576]: named "input" so the STFT's Pad reads it unchanged.
        helper.make_node(
            "Reshape", [FRAMES_INPUT, const("vad/flat", [-1, FRAME_WIDTH])], ["input"]
        ),
        helper.make_node("Shape", [FRAMES_INPUT], ["vad/frames_shape"]),
        helper.make_node(
            "Slice",
            ["vad/frames_shape", const("vad/zero", [0]), const("vad/two", [2])],
            ["vad/batch_window"],
        ),
        # [B, 2, 128] -> [2, B, 128] -> h, c [1, B, 128] (the names the LSTM reads)
        helper.make_node("Transpose", [STATE_INPUT], ["vad/state_t"], perm=[1, 0, 2]),
        helper.make_node("Split", ["vad/state_t", const("vad/split", [1, 1])], ["h", "c"], axis=0),
    ]
    to_time_major = [
        # [B*W, 128, 1] -> [B, W, 128] -> [W, B, 128]: the LSTM runs W steps over B streams.
        helper.make_node(
            "Concat", ["vad/batch_window", const("vad/hidden", [HIDDEN])], ["vad/bwc"], axis=0
        ),
        helper.make_node("Reshape", ["/Relu_3_output_0", "vad/bwc"], ["vad/per_stream"]),
        helper.make_node("Transpose", ["vad/per_stream"], ["/Transpose_output_0"], perm=[1, 0, 2]),
    ]
    tail = [
        # [B, 1, W] -> [B, W] (the original flattened everything to [T])
        helper.make_node("Squeeze", ["/Sigmoid_output_0", const("vad/one", [1])], [PROBS_OUTPUT]),
        # hn, cn [1, B, 128] -> [2, B, 128] -> [B, 2, 128]
        helper.make_node("Concat", ["hn", "cn"], ["vad/state_n"], axis=0),
        helper.make_node("Transpose", ["vad/state_n"], [STATE_OUTPUT], perm=[1, 0, 2]),
    ]
    nodes = list(head)
    for node, output in zip(graph.node, names, strict=True):
        if output == "/Transpose_output_0":
            nodes += to_time_major
        elif output == "speech_probs":
            nodes += tail
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    del graph.output[:]
    del graph.value_info[:]  # shapes inferred for batch 1; inferred again below
    graph.input.extend(
        [
            helper.make_tensor_value_info(
                FRAMES_INPUT, TensorProto.FLOAT, ["batch", "window", FRAME_WIDTH]
            ),
            helper.make_tensor_value_info(STATE_INPUT, TensorProto.FLOAT, ["batch", 2, HIDDEN]),
        ]
    )
    graph.output.extend(
        [
            helper.make_tensor_value_info(PROBS_OUTPUT, TensorProto.FLOAT, ["batch", "window"]),
            helper.make_tensor_value_info(STATE_OUTPUT, TensorProto.FLOAT, ["batch", 2, HIDDEN]),
        ]
    )
    graph.name = MODEL_NAME
    model.doc_string = (
        "Silero VAD 16 kHz (silero-vad 6.2.3), batched windows with carried LSTM state; "
        "built by voicegate export/vad.py"
    )
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def per_chunk_probabilities(sess: onnxruntime.InferenceSession, samples: np.ndarray) -> np.ndarray:
    """The reference: the wheel's per-chunk model, one frame per run, its state fed back."""
    state = np.zeros((2, 1, HIDDEN), np.float32)
    sr = np.array(SAMPLE_RATE, np.int64)
    probs = []
    for frame in frames_of(samples):
        out, state = sess.run(None, {"input": frame[None], "state": state, "sr": sr})
        probs.append(float(out[0, 0]))
    return np.array(probs, np.float32)


def batch_dependence(
    sess: onnxruntime.InferenceSession, streams: Sequence[np.ndarray], window: int
) -> float:
    """Largest change of a window's probabilities or state between running alone and running
    in one batch with windows of other streams (each stream's own state, carried)."""
    frames = [frames_of(s)[:window] for s in streams]
    rng = np.random.default_rng(window)
    # Mid-stream states, different per row: a shared state would hide rows being mixed up.
    states = [(rng.standard_normal((2, HIDDEN)) * 0.5).astype(np.float32) for _ in streams]
    together = sess.run(None, {FRAMES_INPUT: np.stack(frames), STATE_INPUT: np.stack(states)})
    worst = 0.0
    for row, (f, s) in enumerate(zip(frames, states, strict=True)):
        alone = sess.run(None, {FRAMES_INPUT: f[None], STATE_INPUT: s[None]})
        for batched, single in zip(together, alone, strict=True):
            worst = max(worst, float(np.max(np.abs(batched[row] - single[0]))))
    return worst


def noise_streams(n: int, seconds: float = 3.0, seed: int = 5) -> list[np.ndarray]:
    """Synthetic streams: bursts of noise and tones over silence, so probabilities move."""
    rng = np.random.default_rng(seed)
    length = int(seconds * SAMPLE_RATE) // FRAME_SAMPLES * FRAME_SAMPLES
    streams = []
    for _ in range(n):
        t = np.arange(length) / SAMPLE_RATE
        tone = np.sin(2 * np.pi * rng.uniform(100, 400) * t) * (np.sin(2 * np.pi * t) > 0)
        noise = rng.standard_normal(length) * rng.uniform(0.001, 0.1)
        streams.append((0.3 * tone + noise).astype(np.float32))
    return streams


def speech_streams(data_dir: Path | None) -> tuple[list[np.ndarray], list[str]]:
    """The first CHECK_RECORDINGS dev recordings (16 kHz mono), cut to whole frames."""
    from export.devdata import audio_files
    from server.audio import load_file

    if data_dir is None:
        return [], []
    files = audio_files(data_dir)[:CHECK_RECORDINGS]
    streams = []
    for path in files:
        samples = load_file(str(path))[: int(CHECK_SECONDS * SAMPLE_RATE)]
        streams.append(samples[: len(samples) // FRAME_SAMPLES * FRAME_SAMPLES])
    return streams, [p.name for p in files]


def validate(model: Path, data_dir: Path | None) -> dict[str, Any]:
    """Check the window model; returns the figures, raises ExportError on any failure."""
    window_sess = session(model)
    reference = session(per_chunk_model_path())
    speech, names = speech_streams(data_dir)
    streams = speech + noise_streams(CHECK_BATCH)
    worst = {w: 0.0 for w in CHECK_WINDOWS}
    frames = 0
    speech_frames = 0
    for index, samples in enumerate(streams):
        expected = per_chunk_probabilities(reference, samples)
        frames += len(expected)
        if index < len(speech):
            speech_frames += int(np.sum(expected > 0.5))
        for window in CHECK_WINDOWS:
            got = windowed_probabilities(window_sess, samples, window)
            worst[window] = max(worst[window], float(np.max(np.abs(got - expected))))
    diff = max(worst.values())
    if not np.isfinite(diff) or diff > MAX_ABS_DIFF_VS_PER_CHUNK:
        raise ExportError(
            f"{MODEL_NAME}: probabilities differ from the per-chunk silero_vad.onnx by {diff:.3g} "
            f"(limit {MAX_ABS_DIFF_VS_PER_CHUNK:g}; by window size {worst})"
        )
    mates = (speech + noise_streams(CHECK_BATCH, seed=9))[:CHECK_BATCH]
    dependence = {w: batch_dependence(window_sess, mates, w) for w in CHECK_WINDOWS}
    if max(dependence.values()) > MAX_BATCH_DEPENDENCE:
        raise ExportError(
            f"{MODEL_NAME}: a window's output changes by {max(dependence.values()):.3g} with its "
            f"batch-mates (limit {MAX_BATCH_DEPENDENCE:g}; by window size {dependence})"
        )
    return {
        "vs_per_chunk": {
            "reference": "silero_vad.onnx (silero-vad 6.2.3), one frame per run, state fed back",
            "max_abs_diff": float(f"{diff:.3g}"),
            "by_window_frames": {w: float(f"{v:.3g}") for w, v in worst.items()},
            "limit": MAX_ABS_DIFF_VS_PER_CHUNK,
            "frames": frames,
            "speech_recordings": names or "none (no development speech): noise only",
            "speech_frames_over_0.5": speech_frames,
        },
        "batch_invariance": {
            "max_abs_diff": float(f"{max(dependence.values()):.3g}"),
            "by_window_frames": {w: float(f"{v:.3g}") for w, v in dependence.items()},
            "batch": len(mates),
            "limit": MAX_BATCH_DEPENDENCE,
        },
    }


def build_and_validate(work: Path, data_dir: Path | None) -> tuple[Path, dict[str, Any]]:
    """Build the window model into `work`, validate it; the ONNX path and the report figures."""
    import onnx

    path = work / f"{MODEL_NAME}.onnx"
    onnx.save(build_window_model(), str(path))
    figures: dict[str, Any] = {
        "precision": "fp32 Silero VAD 16 kHz, batched windows [B, W, 576] with carried state",
        "source": f"silero-vad 6.2.3 {sequence_model_path().name}, rewired (export/vad.py)",
        **validate(path, data_dir),
    }
    log.info(
        "%s: max abs diff %.2g vs the per-chunk model over %d frames, batch dependence %.2g",
        MODEL_NAME,
        figures["vs_per_chunk"]["max_abs_diff"],
        figures["vs_per_chunk"]["frames"],
        figures["batch_invariance"]["max_abs_diff"],
    )
    return path, figures
