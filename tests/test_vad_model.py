"""Silero VAD: the export (export/vad.py) and the Triton client (server/vad_model.py).

Through the real Triton (session fixture), the probabilities are compared with the silero-vad
wheel's own per-chunk model run frame by frame in process, which is what silero's OnnxWrapper
does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export import repository, triton_config, vad
from server.errors import ExportError
from server.triton_client import TritonClient
from server.vad_model import CONTEXT_SAMPLES, FRAME_SAMPLES, TritonVad, VadState
from tests import speech, tritonkit
from tests.conftest import MODEL_REPOSITORY

VAD_MODEL_FILE = MODEL_REPOSITORY / "silero_vad" / "1" / "model.onnx"

MODEL = "silero_vad"
SECONDS = 12.0  # of each dev recording, to keep the per-chunk reference quick
# Bit-exact in practice (same operators, same order); the bound leaves room for a future ORT.
MATCH = 1e-5
INVARIANT = 1e-6


@pytest.fixture(scope="module")
def reference() -> Any:
    """The wheel's per-chunk silero_vad.onnx in process, one thread."""
    return vad.session(vad.per_chunk_model_path())


@pytest.fixture(scope="module")
def recordings(speech_files: list[Path]) -> list[np.ndarray]:
    """The first dev recordings, 16 kHz mono, cut to whole frames."""
    out = []
    for path in speech_files[:3]:
        samples, rate = speech.read(path)
        assert rate == vad.SAMPLE_RATE and samples.ndim == 1
        samples = samples[: int(SECONDS * rate)]
        out.append(samples[: len(samples) // FRAME_SAMPLES * FRAME_SAMPLES])
    return out


@pytest.fixture
async def client(triton: Any) -> Any:
    async with TritonClient(triton.grpc_url) as opened:
        yield opened


# --- export and configuration (no Triton) ---------------------------------------------------


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_config_parses_with_tritons_schema(target: str) -> None:
    from tritonclient.grpc import model_config_pb2

    files = repository.committed_files(target)
    config = triton_config.parse_config(files[f"{MODEL}/config.pbtxt"].decode())
    assert config.name == MODEL and config.max_batch_size >= 8
    inputs = {t.name: (list(t.dims), t.data_type) for t in config.input}
    outputs = {t.name: (list(t.dims), t.data_type) for t in config.output}
    fp32 = model_config_pb2.TYPE_FP32
    assert inputs == {"frames": ([-1, 576], fp32), "state": ([2, 128], fp32)}
    assert outputs == {"probabilities": ([-1], fp32), "state_out": ([2, 128], fp32)}
    assert config.HasField("dynamic_batching")
    (group,) = config.instance_group
    if target == "cpu":
        assert config.backend == "python" and not config.platform
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert config.parameters["intra_op_thread_count"].string_value == "1"
        assert files[f"{MODEL}/1/model.py"] == repository.MODEL_PY_SOURCE.read_bytes()
    else:
        assert config.platform == "onnxruntime_onnx" and not config.backend
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert f"{MODEL}/1/model.py" not in files


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_vad_only_export_writes_a_validated_model(target: str, tmp_path: Path) -> None:
    from export.pipeline import run_export

    repo = tmp_path / target
    report = run_export(target, repo, tmp_path / "absent", vad_only=True)
    info = report["models"][MODEL]
    assert info["vs_per_chunk"]["max_abs_diff"] <= MATCH
    assert info["vs_per_chunk"]["frames"] > 500
    assert info["batch_invariance"]["max_abs_diff"] <= INVARIANT
    assert (repo / MODEL / "1" / "model.onnx").stat().st_size == info["onnx_bytes"]
    for path, content in repository.committed_files(target).items():
        if path.startswith(f"{MODEL}/"):
            assert (repo / path).read_bytes() == content
    assert sorted(p.name for p in repo.iterdir()) == [MODEL]  # the encoders are not touched


def test_export_validation_fails_a_model_that_mixes_up_its_state(tmp_path: Path) -> None:
    """The check catches a wiring mistake: h and c swapped on the way into the LSTM."""
    import onnx

    model = vad.build_window_model()
    (split,) = [n for n in model.graph.node if n.op_type == "Split"]
    split.output[:] = ["c", "h"]
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match="differ from the per-chunk"):
        vad.validate(path, None)


def test_settings_load_the_vad_model_with_the_encoders() -> None:
    from server.config import Settings
    from server.errors import ConfigError

    settings = Settings.load(environ={})
    assert settings.vad_model == MODEL
    assert settings.triton_models == (*settings.encoder_models, MODEL)
    assert Settings.load(environ={"VOICEGATE_VAD_MODEL": "vad2"}).triton_models[-1] == "vad2"
    with pytest.raises(ConfigError, match="vad_model"):
        Settings.load({"vad_model": "ge2e_int8"}, environ={})


def test_state_checks_its_shapes_and_is_immutable() -> None:
    state = VadState.initial()
    assert state.context.shape == (CONTEXT_SAMPLES,) and state.recurrent.shape == (2, 128)
    assert state.context.dtype == state.recurrent.dtype == np.float32
    assert not state.recurrent.flags.writeable
    with pytest.raises(ValueError, match="recurrent"):
        VadState(np.zeros(64, np.float32), np.zeros((1, 128), np.float32))


# --- through Triton -------------------------------------------------------------------------


@pytest.mark.integration
async def test_model_is_loaded_with_its_config(client: TritonClient) -> None:
    assert await client.is_ready([MODEL])
    config = await client.model_config(MODEL)
    assert [t.name for t in config.input] == ["frames", "state"]
    assert config.max_batch_size == triton_config.MAX_BATCH_SIZE


@pytest.mark.integration
async def test_probabilities_equal_the_per_chunk_model_on_speech(
    client: TritonClient, recordings: list[np.ndarray], reference: Any
) -> None:
    detector = TritonVad(client)
    for samples in recordings:
        probs, state = await detector.probabilities(samples)
        expected = vad.per_chunk_probabilities(reference, samples)
        assert probs.shape == expected.shape == (len(samples) // FRAME_SAMPLES,)
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs, expected, rtol=0, atol=MATCH)
        assert 0.2 < float(np.mean(expected > 0.5)) < 0.99  # real speech, with pauses
        np.testing.assert_array_equal(state.context, samples[-CONTEXT_SAMPLES:])


@pytest.mark.integration
async def test_state_carried_across_calls_gives_one_calls_result(
    client: TritonClient, recordings: list[np.ndarray]
) -> None:
    samples = recordings[0]
    whole, whole_state = await TritonVad(client, window_frames=32).probabilities(samples)
    # Pieces of 1, 3, 50, 7 frames and the rest; windows of another size as well.
    cuts = np.cumsum([1, 3, 50, 7]) * FRAME_SAMPLES
    detector = TritonVad(client, window_frames=16)
    state = None
    parts = []
    for piece in np.split(samples, cuts):
        probs, state = await detector.probabilities(piece, state)
        parts.append(probs)
    assert state is not None
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=INVARIANT)
    np.testing.assert_allclose(state.recurrent, whole_state.recurrent, rtol=0, atol=INVARIANT)
    np.testing.assert_array_equal(state.context, whole_state.context)


@pytest.mark.integration
async def test_same_probabilities_in_any_window_and_in_process(
    client: TritonClient, recordings: list[np.ndarray]
) -> None:
    """Bit for bit: a stream's 64-frame windows, Embed's 512-frame windows, and `OnnxVad`
    (calibration's trim "vad", in process)."""
    from server.vad_model import RECORDING_WINDOW_FRAMES, OnnxVad

    detector, local = TritonVad(client), OnnxVad(VAD_MODEL_FILE)
    for samples in recordings:
        streamed, _ = await detector.probabilities(samples)
        whole, _ = await detector.probabilities(samples, window_frames=RECORDING_WINDOW_FRAMES)
        np.testing.assert_array_equal(whole, streamed)
        np.testing.assert_array_equal(local.probabilities(samples), streamed)


@pytest.mark.integration
async def test_concurrent_streams_are_batched_and_batch_invariant(
    client: TritonClient, recordings: list[np.ndarray]
) -> None:
    detector = TritonVad(client, window_frames=32)
    # 8 streams of different lengths (so their last windows differ in length too).
    streams = [r[: len(r) - i * 3 * FRAME_SAMPLES] for i in range(3) for r in recordings][:8]
    alone = [(await detector.probabilities(s))[0] for s in streams]
    before = await tritonkit.model_counts(client.url, MODEL)
    together = await asyncio.gather(*(detector.probabilities(s) for s in streams))
    after = await tritonkit.model_counts(client.url, MODEL)
    inferences = after.inferences - before.inferences
    executions = after.executions - before.executions
    for single, (batched, _) in zip(alone, together, strict=True):
        np.testing.assert_allclose(batched, single, rtol=0, atol=INVARIANT)
    # Triton merged windows of different streams into one run at least some of the time.
    assert executions < inferences


@pytest.mark.integration
async def test_malformed_audio_is_refused_before_calling_triton(client: TritonClient) -> None:
    detector = TritonVad(client)
    with pytest.raises(ValueError, match="multiple of 512"):
        await detector.probabilities(np.zeros(1000, np.float32))
    with pytest.raises(ValueError, match="one-dimensional"):
        await detector.probabilities(np.zeros((2, 512), np.float32))
    state = VadState.initial()
    probs, same = await detector.probabilities(np.zeros(0, np.float32), state)
    assert probs.shape == (0,) and same is state
