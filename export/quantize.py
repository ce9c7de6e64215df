"""Reduced-precision variants of the fp32 ONNX encoder: int8 (CPU) and fp16 (GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from server.errors import ExportError

if TYPE_CHECKING:
    import onnx


def lstm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """LSTM nodes (plain or quantized) ordered by how many LSTMs lie upstream of them."""
    # "" names an omitted optional input or output, never a tensor
    producer = {out: node for node in model.graph.node for out in node.output if out}
    depth: dict[str, int] = {}

    def upstream_lstms(node: onnx.NodeProto) -> int:
        if node.name not in depth:
            parents = [producer[name] for name in node.input if name in producer]
            depth[node.name] = max((upstream_lstms(p) + _is_lstm(p) for p in parents), default=0)
        return depth[node.name]

    found = [node for node in model.graph.node if _is_lstm(node)]
    return sorted(found, key=upstream_lstms)


def first_lstm(model: onnx.ModelProto) -> onnx.NodeProto:
    """The LSTM that reads the mel input directly (no other LSTM upstream)."""
    nodes = lstm_nodes(model)
    if not nodes:
        raise ExportError("the ONNX encoder holds no LSTM node")
    return nodes[0]


def quantize_int8(fp32_path: Path, int8_path: Path) -> list[str]:
    """Dynamic int8, per-channel weights, first LSTM left fp32; returns the excluded nodes.

    The first LSTM reads power mel (median 1e-4, max about 33): one per-tensor uint8 scale
    for its input turns 94 % of the values into 0, which wrecks the embedding. Later LSTMs read
    tanh-bounded hidden states and quantize well. Only LSTMs are quantized: the final Linear
    (5 % of the weights) would add a batch-dependent activation scale and measurably lowered
    the cosine to fp32 on the dev set, for no measurable speed-up.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = [first_lstm(onnx.load(str(fp32_path))).name]
    quantize_dynamic(
        fp32_path,
        int8_path,
        op_types_to_quantize=["LSTM"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
    )
    return excluded


def convert_fp16(fp32_path: Path, fp16_path: Path) -> None:
    """fp16 weights and compute with fp32 inputs/outputs, for the GPU (ORT's CUDA provider has
    no kernels for the dynamic int8 operators)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    # keep_io_types appends its input Casts at the end of the node list; ONNX wants them sorted.
    OnnxModel.graph_topological_sort(model.graph, is_deterministic=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(fp16_path))


def _is_lstm(node: onnx.NodeProto) -> bool:
    return node.op_type in {"LSTM", "DynamicQuantizeLSTM"}
