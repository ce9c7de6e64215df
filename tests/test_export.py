"""The export: GE2E in torch, ONNX fp32/int8/fp16, validation, Triton repository writer.

One module-scoped fixture runs the whole cpu export into a temporary repository; the other
tests reuse its files. Tests that need real speech skip without the development data.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export import repository, triton_config, validation
from server.errors import ExportError
from tests.conftest import dev_data_dir

ROOT = Path(__file__).resolve().parents[1]
VALIDATION_UTTERANCES = 8
TRIAL_RECORDINGS = 24


NEEDS_DATA = pytest.mark.skipif(
    dev_data_dir() is None,
    reason="no development speech: set VOICEGATE_DATA_DIR to a folder of LibriSpeech FLAC files",
)


@pytest.fixture(scope="module")
def encoder() -> Any:
    from export.encoder import load_encoder

    return load_encoder()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The full cpu export (with real speech when available) into a scratch repository."""
    from export.pipeline import run_export

    repo = tmp_path_factory.mktemp("export") / "model_repository"
    report = run_export(
        "cpu",
        repo,
        dev_data_dir(),
        validation_utterances=VALIDATION_UTTERANCES,
        trial_recordings=TRIAL_RECORDINGS,
        throughput_rounds=1,
    )
    return repo, report


@pytest.fixture(scope="module")
def dev_set() -> Any:
    from export.devdata import load_dev_set

    path = dev_data_dir()
    if path is None:
        pytest.skip("no development speech: set VOICEGATE_DATA_DIR")
    return load_dev_set(path, VALIDATION_UTTERANCES)


def _embed(model: Path) -> Any:
    from export.onnx_export import run, session

    sess = session(model)
    return lambda mels: run(sess, mels)


# --- the torch encoder ---------------------------------------------------------------------


def test_checkpoint_holds_exactly_the_model_and_the_known_training_keys(encoder: Any) -> None:
    import torch

    from export.encoder import TRAINING_ONLY_KEYS, pretrained_path

    state = torch.load(pretrained_path(), map_location="cpu", weights_only=True)["model_state"]
    assert set(state) == set(encoder.state_dict()) | TRAINING_ONLY_KEYS
    assert sum(p.numel() for p in encoder.parameters()) == 1_423_616


def test_encoder_rejects_a_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    import torch

    from export.encoder import load_encoder, pretrained_path

    checkpoint = torch.load(pretrained_path(), map_location="cpu", weights_only=True)
    extra = {"model_state": {**checkpoint["model_state"], "lstm.weight_ih_l3": torch.zeros(1)}}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ExportError, match="unexpected keys"):
        load_encoder(tmp_path / "extra.pt")
    missing = {"model_state": {k: v for k, v in checkpoint["model_state"].items() if "l2" not in k}}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ExportError, match="do not fit"):
        load_encoder(tmp_path / "missing.pt")


def test_encoder_matches_resemblyzer(encoder: Any) -> None:
    import torch
    from resemblyzer import VoiceEncoder

    reference = VoiceEncoder(device="cpu", verbose=False)
    mels = torch.from_numpy(validation.random_partials(5))
    with torch.no_grad():
        expected = reference(mels).numpy()
        actual = encoder(mels).numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)


# --- ONNX ------------------------------------------------------------------------------------


def test_onnx_fp32_matches_torch_at_any_batch(
    exported: tuple[Path, dict[str, Any]], encoder: Any
) -> None:
    import onnx
    import torch

    repo, report = exported
    model = repo / "ge2e_fp32" / "1" / "model.onnx"
    graph = onnx.load(str(model)).graph
    assert [i.name for i in graph.input] == ["mels"]
    assert [o.name for o in graph.output] == ["embedding"]
    embed = _embed(model)
    for batch in (1, 3, 64):
        mels = validation.random_partials(batch, seed=100 + batch)
        with torch.no_grad():
            expected = encoder(torch.from_numpy(mels)).numpy()
        assert np.abs(embed(mels) - expected).max() <= validation.FP32_MAX_ABS_DIFF
    assert report["fp32_vs_torch"]["max_abs_diff"] <= validation.FP32_MAX_ABS_DIFF
    assert report["opset"] == 17


def test_int8_keeps_the_first_lstm_fp32_and_quantizes_the_others(
    exported: tuple[Path, dict[str, Any]],
) -> None:
    import onnx
    from onnx import TensorProto

    from export.int8_invariant import PADDED
    from export.quantize import lstm_nodes

    model = onnx.load(str(exported[0] / "ge2e_int8" / "1" / "model.onnx"))
    weights = {init.name: init for init in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output if out}
    first, *rest = lstm_nodes(model)
    assert first.op_type == "LSTM"
    assert producer[first.input[0]].op_type == "Transpose"  # it reads the mel input
    assert list(producer[first.input[0]].input) == ["mels"]
    assert weights[first.input[1]].data_type == TensorProto.FLOAT
    assert [n.op_type for n in rest] == ["DynamicQuantizeLSTM", "DynamicQuantizeLSTM"]
    for node in rest:
        assert weights[node.input[1]].data_type == TensorProto.INT8  # W, per-channel
        assert weights[node.input[2]].data_type == TensorProto.INT8  # R
        assert list(weights[node.input[8]].dims) == [1, 4 * PADDED]  # one scale per channel
    for node in (first, *rest):
        hidden = next(a.i for a in node.attribute if a.name == "hidden_size")
        assert hidden == PADDED  # 256 real units and the two anchors
        assert node.input[5] and node.input[6]  # initial_h and initial_c hold the anchors


@NEEDS_DATA
def test_int8_utterance_embeddings_stay_close_to_fp32(
    exported: tuple[Path, dict[str, Any]],
) -> None:
    figures = exported[1]["models"]["ge2e_int8"]["vs_fp32"]
    for check in ("per_utterance", "mixed_batches"):
        assert figures[check]["utterances"] == VALIDATION_UTTERANCES
        assert figures[check]["cosine_min"] >= validation.MIN_UTTERANCE_COSINE == 0.999
    assert figures["trial_halves"]["utterances"] >= 2 * TRIAL_RECORDINGS - 4
    assert figures["trial_halves"]["cosine_min"] >= 0.999


@NEEDS_DATA
def test_export_reports_eer_speed_and_invariance_of_each_precision(
    exported: tuple[Path, dict[str, Any]],
) -> None:
    repo, report = exported
    int8 = json.loads((repo / "ge2e_int8" / "1" / "export_report.json").read_text())
    fp32 = report["models"]["ge2e_fp32"]
    # calibration: seeded, recorded, and held out of the trials
    calibration = int8["calibration"]
    assert calibration["seed"] == 0 and len(calibration["partials_sha256"]) == 64
    assert calibration["partials"] == 256 and calibration["recordings"] == 32
    assert int8["weights"]["rounding"] == "GPTQ, act-order"
    # dev EER for each precision, and how far int8 moved it
    assert int8["eer"]["same_speaker_trials"] >= TRIAL_RECORDINGS - 2
    assert int8["eer"]["delta_vs_fp32_points"] == pytest.approx(
        int8["eer"]["eer_percent"] - fp32["eer"]["eer_percent"], abs=1e-3
    )
    assert int8["eer"]["delta_enforced"] is False  # too few trials in this quick export
    # exact under batching: alone vs batched with others
    for figures in (int8, fp32):
        assert figures["batch_invariance"]["max_abs_diff"] <= 1e-5
        assert set(figures["throughput"]["by_batch"]) == {"1", "8", "32"}
    assert int8["throughput"]["speedup_vs_fp32_at_32"] > 1.0
    # the comparison table, in the report and next to each model
    table = {row["model"]: row for row in report["precision"]["table"]}
    assert set(table) == {"ge2e_int8", "ge2e_fp32"}
    assert int8["precision_summary"] == report["precision"]["table"]
    assert table["ge2e_int8"]["onnx_mb"] < 0.5 * table["ge2e_fp32"]["onnx_mb"]
    assert table["ge2e_int8"]["cosine_to_fp32_min"] >= 0.999
    assert table["ge2e_int8"]["batch_invariance_max_abs_diff"] == 0.0


def test_kernel_bounds_are_the_extremes_of_the_lstm_activations() -> None:
    from export import int8_invariant as inv

    bounds = inv.kernel_bounds()
    tanh, sigmoid = inv._unary_session("Tanh"), inv._unary_session("Sigmoid")
    x = np.concatenate([np.linspace(-300, 300, 200_001), [bounds.tanh_max_at]]).astype(np.float32)
    assert inv._run_unary(tanh, x).max() <= bounds.tanh_max
    assert inv._run_unary(tanh, x).min() >= bounds.tanh_min
    assert inv._run_unary(sigmoid, x).max() <= bounds.sigmoid_max
    at = np.array([bounds.tanh_max_at, bounds.sigmoid_max_at, bounds.sigmoid_one_at], np.float32)
    assert inv._run_unary(tanh, at[:1])[0] == np.float32(bounds.tanh_max)
    assert inv._run_unary(sigmoid, at[1:]).tolist() == [np.float32(bounds.sigmoid_max), 1.0]
    assert bounds.h_max >= 1.0 and bounds.h_min <= -1.0
    scale, zero_point = bounds.quantization()
    assert scale == pytest.approx(2.0 / 255, rel=1e-5) and zero_point in (127, 128)


def test_anchors_hold_their_value_through_the_sequence(encoder: Any) -> None:
    """The anchored fp32 graph is the encoder (fp32 ONNX to 1e-5), and every layer's anchor
    units sit at exactly h_max and h_min at every time step."""
    import onnx
    import onnxruntime
    import torch

    from export import int8_invariant as inv

    bounds = inv.kernel_bounds()
    model = inv.build_model(encoder, bounds, quantize=False)
    outputs = ["y0", "y1"]
    for name in outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    sess = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    mels = validation.random_partials(5, seed=3)
    embedding, *hidden = sess.run(["embedding", *outputs], {"mels": mels})
    with torch.no_grad():
        expected = encoder(torch.from_numpy(mels)).numpy()
    np.testing.assert_allclose(embedding, expected, atol=1e-5)
    for y in hidden:  # [T, 1, B, 258]
        assert np.all(y[..., inv.HIDDEN] == np.float32(bounds.h_max))
        assert np.all(y[..., inv.HIDDEN + 1] == np.float32(bounds.h_min))
        assert np.abs(y[..., : inv.HIDDEN]).max() <= bounds.h_max


def test_gptq_rounds_for_the_calibration_input() -> None:
    """GPTQ's output error on inputs like the calibration's is below round-to-nearest's, with
    the same per-channel grid; it is deterministic."""
    from export.int8_invariant import gptq, round_to_nearest

    rng = np.random.default_rng(0)
    w, r = rng.standard_normal((64, 24)), rng.standard_normal((64, 16))
    x = rng.standard_normal((2000, 40)) @ rng.standard_normal((40, 40))
    hessian = x.T @ x
    qw, qr = gptq([w, r], hessian)
    again = gptq([w, r], hessian)
    assert np.array_equal(qw.q, again[0].q) and np.array_equal(qr.q, again[1].q)
    np.testing.assert_array_equal(qw.scale, round_to_nearest(w).scale)
    assert np.abs(qw.q.astype(int)).max() <= 127
    full = np.concatenate([w, r], axis=1)

    def error(parts: list[Any]) -> float:
        return float(
            np.mean((x @ (full - np.concatenate([p.dequantized() for p in parts], 1)).T) ** 2)
        )

    assert error([qw, qr]) < 0.8 * error([round_to_nearest(w), round_to_nearest(r)])


def test_int8_build_is_reproducible(encoder: Any) -> None:
    """Same weights and calibration partials: byte-identical model."""
    from export import int8_invariant as inv

    bounds = inv.kernel_bounds()
    calibration = validation.random_partials(8, seed=5)
    first = inv.build_model(encoder, bounds, calibration).SerializeToString()
    assert inv.build_model(encoder, bounds, calibration.copy()).SerializeToString() == first
    assert inv.partials_digest(calibration) == inv.partials_digest(calibration.copy())


def test_fp16_runs_on_cpu_and_stays_close_to_fp32(
    exported: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    import onnx

    from export.quantize import convert_fp16

    fp32 = exported[0] / "ge2e_fp32" / "1" / "model.onnx"
    convert_fp16(fp32, tmp_path / "fp16.onnx")
    graph = onnx.load(str(tmp_path / "fp16.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    mels = validation.random_partials(16, seed=7)
    a, b = _embed(fp32)(mels), _embed(tmp_path / "fp16.onnx")(mels)
    assert np.sum(a * b, axis=1).min() > 0.999


# --- validation fails loudly -------------------------------------------------------------


def test_fp32_check_raises_on_a_corrupted_model(
    exported: tuple[Path, dict[str, Any]], encoder: Any, tmp_path: Path
) -> None:
    import onnx
    from onnx import numpy_helper

    from export.pipeline import check_fp32

    model = onnx.load(str(exported[0] / "ge2e_fp32" / "1" / "model.onnx"))
    for init in model.graph.initializer:
        if init.name == "linear.bias":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.05, init.name))
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with pytest.raises(ExportError, match="max abs difference"):
        check_fp32(encoder, tmp_path / "broken.onnx", None)


@NEEDS_DATA
def test_cosine_check_raises_on_naive_quantization(
    exported: tuple[Path, dict[str, Any]], dev_set: Any, tmp_path: Path
) -> None:
    """All LSTMs quantized per-tensor (the first one too) is what the check must catch."""
    from onnxruntime.quantization import quantize_dynamic

    from export.onnx_export import run, session
    from export.pipeline import _compare_to_fp32

    fp32 = exported[0] / "ge2e_fp32" / "1" / "model.onnx"
    quantize_dynamic(fp32, tmp_path / "naive.onnx", op_types_to_quantize=["LSTM"])
    naive, reference = session(tmp_path / "naive.onnx"), session(fp32)
    with pytest.raises(ExportError, match=r"below 0\.999"):
        _compare_to_fp32(
            "naive int8",
            lambda m: run(naive, m),
            lambda m: run(reference, m),
            dev_set,
        )


def test_cosine_check_names_the_worst_utterance() -> None:
    good = np.eye(3, dtype=np.float32)
    bad = good.copy()
    bad[1] = [0.6, 0.8, 0.0]
    assert validation.check_cosine("same", good, good, ["a", "b", "c"])["cosine_min"] == 1.0
    with pytest.raises(ExportError, match="for b, below"):
        validation.check_cosine("bad", bad, good, ["a", "b", "c"])


def test_missing_data_skips_the_speech_checks_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.pipeline import _dev_set

    monkeypatch.delenv("VOICEGATE_DATA_DIR", raising=False)
    warnings: list[str] = []
    assert _dev_set(None, tmp_path / "absent", 40, warnings) is None  # resolved: none there
    assert "SKIPPED" in warnings[0]
    assert "WARNING" in capsys.readouterr().err


def test_unknown_target_and_wrong_repository_are_refused(tmp_path: Path) -> None:
    from export.pipeline import run_export

    with pytest.raises(ExportError, match="unknown export target"):
        run_export("tpu", tmp_path)
    # The committed cpu repository must never be overwritten by the gpu target's ge2e_fp32.
    with pytest.raises(ExportError, match="another export target"):
        run_export("gpu", ROOT / "model_repository")


# --- Triton repository ---------------------------------------------------------------------


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_configs_parse_with_tritons_schema(target: str) -> None:
    from tritonclient.grpc import model_config_pb2

    files = repository.committed_files(target)
    configs = {p.split("/")[0]: c for p, c in files.items() if p.endswith("config.pbtxt")}
    assert sorted(configs) == sorted(repository.TARGET_MODELS[target])
    for name, text in configs.items():
        if name == repository.VAD_MODEL:
            continue  # its own inputs and outputs: tests/test_vad_model.py
        config = triton_config.parse_config(text.decode())
        assert config.name == name
        assert config.max_batch_size == 64
        (mels,) = config.input
        (embedding,) = config.output
        assert (mels.name, list(mels.dims)) == ("mels", [160, 40])
        assert (embedding.name, list(embedding.dims)) == ("embedding", [256])
        assert mels.data_type == embedding.data_type == model_config_pb2.TYPE_FP32
        assert config.HasField("dynamic_batching")
        assert config.dynamic_batching.max_queue_delay_microseconds >= 0
        (group,) = config.instance_group
        if target == "cpu":
            assert config.backend == "python" and not config.platform
            assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
            assert config.parameters["intra_op_thread_count"].string_value == "1"
            assert f"{name}/1/model.py" in files
        else:
            assert config.platform == "onnxruntime_onnx" and not config.backend
            assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
            assert not any(p.endswith("model.py") for p in files)
            accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
            if name != "ge2e_trt_fp16":
                assert not accelerators  # ONNX Runtime's CUDA provider
                continue
            (tensorrt,) = accelerators
            assert tensorrt.name == "tensorrt"
            assert tensorrt.parameters["precision_mode"] == "FP16"
            assert tensorrt.parameters["trt_engine_cache_enable"] == "1"
            # one optimisation profile from batch 1 to max_batch_size: no engine rebuilds
            assert tensorrt.parameters["trt_profile_min_shapes"] == "mels:1x160x40"
            assert tensorrt.parameters["trt_profile_max_shapes"] == "mels:64x160x40"


def test_gpu_export_writes_fp16_and_the_tensorrt_variant(tmp_path: Path) -> None:
    """Without dev speech (quick): fp32, fp16 and the fp32 ONNX for TensorRT FP16."""
    import onnx

    from export.pipeline import run_export

    repo = tmp_path / "gpu"
    report = run_export("gpu", repo, tmp_path / "absent", throughput_rounds=1)
    assert sorted(report["models"]) == ["ge2e_fp16", "ge2e_fp32", "ge2e_trt_fp16", "silero_vad"]
    fp32 = (repo / "ge2e_fp32" / "1" / "model.onnx").read_bytes()
    assert (repo / "ge2e_trt_fp16" / "1" / "model.onnx").read_bytes() == fp32
    fp16 = onnx.load(str(repo / "ge2e_fp16" / "1" / "model.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
    assert "not validated here" in report["models"]["ge2e_trt_fp16"]["validated_on"]
    assert report["models"]["ge2e_fp16"]["batch_invariance"]["max_abs_diff"] <= 1e-5
    assert "throughput" not in report["models"]["ge2e_fp16"]  # measured on the GPU instead
    for path, content in repository.committed_files("gpu").items():
        assert (repo / path).read_bytes() == content


def test_committed_model_repository_is_what_the_writer_produces() -> None:
    for path, content in repository.committed_files("cpu").items():
        committed = ROOT / "model_repository" / path
        assert committed.is_file(), f"{committed} missing: run `voicegate export`"
        assert committed.read_bytes() == content, f"{committed} is stale: run `voicegate export`"


def test_export_writes_the_layout_and_reports(exported: tuple[Path, dict[str, Any]]) -> None:
    repo, report = exported
    files = repository.committed_files("cpu")
    for path, content in files.items():
        assert (repo / path).read_bytes() == content
    for name in ("ge2e_int8", "ge2e_fp32"):
        saved = json.loads((repo / name / "1" / "export_report.json").read_text())
        assert saved == json.loads(json.dumps(report["models"][name]))
        assert saved["onnx_bytes"] == (repo / name / "1" / "model.onnx").stat().st_size
        assert saved["opset"] == 17 and saved["versions"]["onnxruntime"]
    sizes = {name: info["onnx_bytes"] for name, info in report["models"].items()}
    assert sizes["ge2e_int8"] < 0.5 * sizes["ge2e_fp32"]
    assert not list(repo.rglob(".*"))  # no temporary files left behind


# --- the Python-backend model.py, with a stand-in for Triton's pb_utils -----------------------


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Request:
    def __init__(self, **inputs: np.ndarray) -> None:
        self._inputs = [_Tensor(k, v) for k, v in inputs.items()]

    def inputs(self) -> list[_Tensor]:
        return self._inputs


class _Response:
    def __init__(self, output_tensors: list[_Tensor], error: Any = None) -> None:
        self.output_tensors, self.error = output_tensors, error


class _TritonError(Exception):
    INVALID_ARG = 3

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


@pytest.fixture
def triton_model(
    monkeypatch: pytest.MonkeyPatch, exported: tuple[Path, dict[str, Any]]
) -> tuple[Any, Path]:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = _Tensor  # type: ignore[attr-defined]
    fake.InferenceResponse = _Response  # type: ignore[attr-defined]
    fake.TritonError = _TritonError  # type: ignore[attr-defined]
    fake.get_input_tensor_by_name = lambda request, name: next(  # type: ignore[attr-defined]
        (t for t in request.inputs() if t.name() == name), None
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(sys.modules, "export.triton_python_model", raising=False)
    module = importlib.import_module("export.triton_python_model")
    model_dir = exported[0] / "ge2e_int8"
    model = module.TritonPythonModel()
    config = triton_config.parse_config((model_dir / "config.pbtxt").read_text())
    from google.protobuf import json_format

    model.initialize(
        {
            "model_config": json.dumps(
                json_format.MessageToDict(config, preserving_proto_field_name=True)
            ),
            "model_repository": str(model_dir),
            "model_version": "1",
            "model_name": "ge2e_int8",
        }
    )
    return model, model_dir / "1" / "model.onnx"


def test_triton_model_runs_a_dynamic_batch_in_one_go(triton_model: tuple[Any, Path]) -> None:
    model, onnx_file = triton_model
    assert model.session.get_session_options().intra_op_num_threads == 1
    a = validation.random_partials(2, seed=1)
    b = validation.random_partials(3, seed=2)
    requests = [
        _Request(mels=a),
        _Request(mels=np.zeros((1, 10, 40), np.float32)),
        _Request(mels=b),
        _Request(other=a),
    ]
    responses = model.execute(requests)
    assert len(responses) == 4
    together = _embed(onnx_file)(np.concatenate([a, b]))
    np.testing.assert_array_equal(responses[0].output_tensors[0].as_numpy(), together[:2])
    np.testing.assert_array_equal(responses[2].output_tensors[0].as_numpy(), together[2:])
    assert responses[0].error is None and responses[2].error is None
    assert "shape [1, 10, 40]" in str(responses[1].error)
    assert responses[1].error.code == _TritonError.INVALID_ARG
    assert "missing" in str(responses[3].error)


def test_triton_model_reports_a_runtime_failure_to_every_request(
    triton_model: tuple[Any, Path],
) -> None:
    model, _ = triton_model

    class Broken:
        def run(self, *args: Any) -> Any:
            raise RuntimeError("out of memory")

    model.session = Broken()
    requests = [_Request(mels=validation.random_partials(1)) for _ in range(2)]
    responses = model.execute(requests)
    assert all("out of memory" in str(r.error) for r in responses)


# --- import hygiene ------------------------------------------------------------------------


def test_importing_the_pipeline_loads_no_heavy_modules() -> None:
    code = (
        "import sys, export.pipeline, export.triton_config, export.repository; "
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
