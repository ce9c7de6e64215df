"""torch → ONNX, and ONNX Runtime sessions configured the way the server runs them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime

    from export.encoder import SpeakerEncoder

OPSET = 17
INPUT_NAME = "mels"
OUTPUT_NAME = "embedding"
PARTIAL_FRAMES = 160
N_MELS = 40


def export_onnx(model: SpeakerEncoder, path: Path) -> Path:
    """Write the encoder as a single-file ONNX model with a dynamic batch axis."""
    import warnings

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, PARTIAL_FRAMES, N_MELS)
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter warns that an LSTM traced at batch 2 may fail at other batch sizes: its
        # h0/c0 are built from the input's shape here, and the export checks batches 1, 7, 64.
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size")
        # nn.LSTM's own input-size checks, constant for 40 mel bands.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The TorchScript exporter: the dynamo one needs onnxscript and opset 18, and splits
        # the weights into a separate .onnx.data file.
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    return path


def session(path: Path, threads: int = 1) -> onnxruntime.InferenceSession:
    """A CPU session with `threads` intra-op threads, sequential, as the Triton model.py uses."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: onnxruntime.InferenceSession, mels: np.ndarray) -> np.ndarray:
    """Embeddings [B, 256] of partials [B, 160, 40]."""
    (out,) = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(mels, dtype=np.float32)})
    return np.asarray(out, dtype=np.float32)
