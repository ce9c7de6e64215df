"""Batch-invariant int8 GE2E encoder: ONNX Runtime's fused int8 LSTM with pinned activation
ranges and GPTQ-rounded weights.

Why. `DynamicQuantizeLSTM` (ONNX Runtime's int8 LSTM) quantizes each GEMM input with one
scale and zero point taken from the min and max of the whole tensor: every time step's
h_{t-1} [batch, hidden] and the layer input [time * batch, input]. Behind Triton's dynamic
batcher that tensor holds other requests, so an utterance's embedding depended on its
batch-mates (up to 0.01 absolute per dimension).

How. Each LSTM gets two extra hidden units, "anchors", with zero weights to and from the real
units, whose hidden state is held at the largest and the smallest value an LSTM hidden state
h = o * tanh(c) can take with ONNX Runtime's own sigmoid and tanh kernels (found by
`kernel_bounds`, an exhaustive search over float32 inputs). Every row of every quantized
tensor then contains exactly that min and max, so the scale and zero point ONNX Runtime
computes are the same constants for any batch: the quantization is static in effect, and an
utterance's embedding is bit-identical alone or batched. The anchors cost 2 of 258 hidden
units (+1.6 % GEMM work); the fused kernels stay, so the speed is that of dynamic int8.

- The anchor's forget gate is exactly 1.0 and its cell input tanh(0) exactly 0.0, so its cell
  state keeps the value it starts with (initial_c) and its hidden state is the constant
  sigmoid_max * tanh_max (initial_h holds the same value for step 0).
- The first LSTM stays fp32: it reads power mel (median 1e-4, max about 33), which no
  per-tensor int8 scale represents (NOTES.md); its anchors only pin the range of its output,
  the second LSTM's input. ONNX Runtime's fp32 LSTM and MatMul are row-wise bit-exact across
  batch sizes (measured), so the whole graph is.
- Weights: int8 symmetric per output channel (scale max|w| / 127). Their rounding is chosen
  by GPTQ (Frantar et al. 2022, one-shot second-order rounding with error feedback) on a
  seeded sample of development speech: weight rounding was 3/4 of the int8 error with
  round-to-nearest, and GPTQ cut it about 7-fold. Activations need no calibration: their range
  is the analytic range of h, which the anchors pin.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from export.encoder import EMBEDDING, HIDDEN, LAYERS
from export.onnx_export import N_MELS, OPSET, PARTIAL_FRAMES
from server.errors import ExportError

if TYPE_CHECKING:
    import onnx

    from export.encoder import SpeakerEncoder

ANCHORS = 2  # one unit at the largest hidden value, one at the smallest
PADDED = HIDDEN + ANCHORS
MS_DOMAIN = "com.microsoft"
# torch keeps LSTM gates as (i, f, g, o); ONNX as (i, o, f, c).
ONNX_GATES = (0, 3, 1, 2)
GATE_INPUT, GATE_OUTPUT, GATE_FORGET, GATE_CELL = range(4)  # positions in the ONNX order
# Pre-activation of the anchor's forget gate: far past the sigmoid's saturation.
FORGET_SATURATED = 100.0
# Inputs searched for the kernels' extremes: every float32 of magnitude in [2^-2, 2^8).
SEARCH_EXPONENTS = (-2, 8)
INT8_MAX = 127
CALIBRATION_SEED = 0
CALIBRATION_FILES = 32
CALIBRATION_PARTIALS = 256
GPTQ_DAMPING = 0.01
GPTQ_BLOCK = 64


# ------------------------------------------------------------------- the kernels' extremes


@dataclass(frozen=True)
class KernelBounds:
    """Where ONNX Runtime's float32 tanh and sigmoid reach their extremes on this machine.

    Its kernels are rational approximations that overshoot 1 slightly (tanh reaches
    1.0000002 near 8.48, not at saturation), so the anchors sit exactly at the maxima.
    """

    tanh_max_at: float
    tanh_max: float
    tanh_min_at: float
    tanh_min: float
    sigmoid_max_at: float
    sigmoid_max: float
    sigmoid_one_at: float  # sigmoid is exactly 1.0 here: the anchors' forget gate

    @property
    def h_max(self) -> float:
        """The largest hidden state o * tanh(c) the LSTM kernel can produce."""
        return float(np.float32(self.tanh_max) * np.float32(self.sigmoid_max))

    @property
    def h_min(self) -> float:
        return float(np.float32(self.tanh_min) * np.float32(self.sigmoid_max))

    def quantization(self) -> tuple[float, int]:
        """The (scale, zero point) ONNX Runtime derives from a tensor spanning [h_min, h_max]."""
        low, high = np.float32(min(self.h_min, 0.0)), np.float32(max(self.h_max, 0.0))
        scale = np.float32((high - low) / np.float32(255.0))
        zero_point = int(np.clip(np.rint(np.float32(-low) / scale), 0, 255))  # half to even
        return float(scale), zero_point

    def as_dict(self) -> dict[str, Any]:
        scale, zero_point = self.quantization()
        return {
            **{k: _f32_repr(v) for k, v in asdict(self).items()},
            "h_max": _f32_repr(self.h_max),
            "h_min": _f32_repr(self.h_min),
            "activation_scale": scale,
            "activation_zero_point": zero_point,
        }


@functools.lru_cache(maxsize=1)
def kernel_bounds() -> KernelBounds:
    """Exhaustive search of ONNX Runtime's Tanh and Sigmoid (the kernels its LSTM uses, MLAS)
    over all float32 inputs of magnitude 0.25..256; beyond, the kernels clamp their input."""
    tanh, sigmoid = _unary_session("Tanh"), _unary_session("Sigmoid")
    tanh_max_at, tanh_max = _extreme(tanh, positive=True, largest=True)
    tanh_min_at, tanh_min = _extreme(tanh, positive=False, largest=False)
    sigmoid_max_at, sigmoid_max = _extreme(sigmoid, positive=True, largest=True)
    probe = np.array([0.0, FORGET_SATURATED, 1e4, 1e30, -1e30], dtype=np.float32)
    tanh_probe = _run_unary(tanh, probe)
    sigmoid_probe = _run_unary(sigmoid, probe)
    problems = []
    if tanh_probe[0] != 0.0:
        problems.append(f"tanh(0) = {tanh_probe[0]!r}, not exactly 0")
    if sigmoid_probe[1] != 1.0:
        problems.append(f"sigmoid({FORGET_SATURATED}) = {sigmoid_probe[1]!r}, not exactly 1")
    if tanh_probe[2:].max() > tanh_max or tanh_probe[2:].min() < tanh_min:
        problems.append(f"tanh beyond the searched range exceeds {tanh_max!r}: {tanh_probe}")
    if sigmoid_probe[2:].max() > sigmoid_max:
        problems.append(f"sigmoid beyond the searched range exceeds {sigmoid_max!r}")
    if problems:
        raise ExportError(
            "ONNX Runtime's activation kernels do not allow pinned int8 ranges: "
            + "; ".join(problems)
        )
    return KernelBounds(
        tanh_max_at=tanh_max_at,
        tanh_max=tanh_max,
        tanh_min_at=tanh_min_at,
        tanh_min=tanh_min,
        sigmoid_max_at=sigmoid_max_at,
        sigmoid_max=sigmoid_max,
        sigmoid_one_at=FORGET_SATURATED,
    )


def _unary_session(op: str) -> Any:
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"])],
        op.lower(),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _run_unary(sess: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(sess.run(None, {"x": x})[0], dtype=np.float32)


def _extreme(sess: Any, positive: bool, largest: bool) -> tuple[float, float]:
    """(input, value) of the kernel's max (or min) over the searched float32 inputs."""
    low, high = (np.float32(2.0**e) for e in SEARCH_EXPONENTS)
    start = int(low.view(np.uint32))
    stop = int(high.view(np.uint32))
    sign = np.uint32(0) if positive else np.uint32(0x80000000)
    best_x, best_y = 0.0, None
    chunk = 1 << 22
    for first in range(start, stop, chunk):
        bits = np.arange(first, min(first + chunk, stop), dtype=np.uint32) | sign
        x = bits.view(np.float32)
        y = _run_unary(sess, x)
        k = int(np.argmax(y) if largest else np.argmin(y))
        if best_y is None or (y[k] > best_y if largest else y[k] < best_y):
            best_x, best_y = float(x[k]), float(y[k])
    assert best_y is not None
    return best_x, best_y


def _f32_repr(value: float) -> float:
    """The float32 value as the shortest decimal that round-trips through float32."""
    return float(np.format_float_positional(np.float32(value), unique=True))


# ------------------------------------------------------------------------ weights


@dataclass(frozen=True)
class LayerWeights:
    """One LSTM layer in ONNX gate order (i, o, f, c): W [4H, I], R [4H, H], bias [4H]."""

    w: np.ndarray
    r: np.ndarray
    bias: np.ndarray  # W and R biases summed


def encoder_weights(
    encoder: SpeakerEncoder,
) -> tuple[list[LayerWeights], np.ndarray, np.ndarray]:
    """Per-layer LSTM weights (ONNX gate order), linear weight [256, 256] and bias."""
    state = {
        k: v.detach().cpu().numpy().astype(np.float32) for k, v in encoder.state_dict().items()
    }
    layers = []
    for layer in range(LAYERS):

        def reorder(a: np.ndarray) -> np.ndarray:
            return np.concatenate([np.split(a, 4, axis=0)[g] for g in ONNX_GATES], axis=0)

        bias = state[f"lstm.bias_ih_l{layer}"] + state[f"lstm.bias_hh_l{layer}"]
        layers.append(
            LayerWeights(
                w=reorder(state[f"lstm.weight_ih_l{layer}"]),
                r=reorder(state[f"lstm.weight_hh_l{layer}"]),
                bias=reorder(bias),
            )
        )
    return layers, state["linear.weight"], state["linear.bias"]


def _pad_gates(matrix: np.ndarray, columns: int) -> np.ndarray:
    """[4H, K] → [4 * PADDED, columns]: each gate block gets the anchor rows (zero), and
    columns for the anchor inputs (zero), so real and anchor units never interact."""
    out = np.zeros((4, PADDED, columns), dtype=matrix.dtype)
    out[:, :HIDDEN, : matrix.shape[1]] = matrix.reshape(4, HIDDEN, -1)
    return out.reshape(4 * PADDED, columns)


def _anchor_bias(bias: np.ndarray, bounds: KernelBounds) -> np.ndarray:
    """ONNX LSTM bias [8 * PADDED]: W bias with the anchors' gate pre-activations, R bias 0."""
    wb = np.zeros((4, PADDED), dtype=np.float32)
    wb[:, :HIDDEN] = bias.reshape(4, HIDDEN)
    wb[GATE_INPUT, HIDDEN:] = 0.0  # any value: the cell input below is exactly 0
    wb[GATE_OUTPUT, HIDDEN:] = bounds.sigmoid_max_at
    wb[GATE_FORGET, HIDDEN:] = bounds.sigmoid_one_at
    wb[GATE_CELL, HIDDEN:] = 0.0  # tanh(0) == 0: the anchors' cell state never changes
    return np.concatenate([wb.reshape(-1), np.zeros(4 * PADDED, np.float32)])


def _anchor_states(bounds: KernelBounds) -> tuple[np.ndarray, np.ndarray]:
    """initial_h, initial_c [1, 1, PADDED]: real units 0, anchors at their fixed point."""
    h0 = np.zeros((1, 1, PADDED), dtype=np.float32)
    c0 = np.zeros((1, 1, PADDED), dtype=np.float32)
    h0[..., HIDDEN], h0[..., HIDDEN + 1] = bounds.h_max, bounds.h_min
    c0[..., HIDDEN], c0[..., HIDDEN + 1] = bounds.tanh_max_at, bounds.tanh_min_at
    return h0, c0


# --------------------------------------------------------------------- quantization


@dataclass(frozen=True)
class QuantizedMatrix:
    """int8 [rows, cols] with one float scale per row (symmetric, zero point 0)."""

    q: np.ndarray
    scale: np.ndarray

    def dequantized(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[:, None]


def row_scales(matrix: np.ndarray) -> np.ndarray:
    scale = np.abs(matrix).max(axis=1) / INT8_MAX
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def round_to_nearest(matrix: np.ndarray) -> QuantizedMatrix:
    scale = row_scales(matrix)
    q = np.clip(np.rint(matrix / scale[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return QuantizedMatrix(q, scale)


def gptq(
    matrices: Sequence[np.ndarray], hessian: np.ndarray, damping: float = GPTQ_DAMPING
) -> list[QuantizedMatrix]:
    """GPTQ rounding of matrices that share their rows and read one concatenated input.

    `matrices` [rows, k_i] each keep their own per-row scale (max |w| / 127);
    `hessian` [sum k_i, sum k_i] is X^T X of the concatenated calibration input. Columns are
    quantized in order of decreasing input energy ("act order"), each column's rounding error
    fed back into the columns not yet quantized through the inverse Hessian's Cholesky factor.
    """
    widths = [m.shape[1] for m in matrices]
    weights = np.concatenate(matrices, axis=1).astype(np.float64)
    scales = [row_scales(m) for m in matrices]
    column_scale = np.concatenate(
        [
            np.repeat(s[:, None].astype(np.float64), w, axis=1)
            for s, w in zip(scales, widths, strict=True)
        ],
        axis=1,
    )
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    weights[:, dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable")
    weights, column_scale = weights[:, order], column_scale[:, order]
    h = h[np.ix_(order, order)]
    h += damping * float(np.mean(np.diag(h))) * np.eye(len(h))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError as exc:
        raise ExportError(f"GPTQ: calibration Hessian is not positive definite ({exc})") from None
    q = np.zeros_like(weights)
    for start in range(0, weights.shape[1], GPTQ_BLOCK):  # "lazy batch" updates
        stop = min(start + GPTQ_BLOCK, weights.shape[1])
        errors = np.zeros((weights.shape[0], stop - start))
        for i in range(start, stop):
            q[:, i] = np.clip(np.rint(weights[:, i] / column_scale[:, i]), -INT8_MAX, INT8_MAX)
            error = (weights[:, i] - q[:, i] * column_scale[:, i]) / upper[i, i]
            weights[:, i + 1 : stop] -= np.outer(error, upper[i, i + 1 : stop])
            errors[:, i - start] = error
        weights[:, stop:] -= errors @ upper[start:stop, stop:]
    q = q[:, np.argsort(order)]
    bounds = np.cumsum([0, *widths])
    return [
        QuantizedMatrix(q[:, a:b].astype(np.int8), s)
        for a, b, s in zip(bounds[:-1], bounds[1:], scales, strict=True)
    ]


def fake_quantize(x: np.ndarray, bounds: KernelBounds) -> np.ndarray:
    """What ONNX Runtime's uint8 quantization with the pinned range makes of `x`."""
    scale, zero_point = bounds.quantization()
    q = np.clip(np.rint(x / np.float32(scale)) + zero_point, 0, 255)
    return ((q - zero_point) * np.float32(scale)).astype(np.float32)


def layer_outputs(encoder: SpeakerEncoder, partials: np.ndarray) -> list[np.ndarray]:
    """Hidden states [B, T, 256] of each LSTM layer, fp32 (torch, one thread: the same sums
    in the same order on every run, so the same calibration gives the same model)."""
    import torch

    lstm = encoder.lstm
    outputs = []
    x = torch.from_numpy(np.ascontiguousarray(partials, dtype=np.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for layer in range(LAYERS):
                single = torch.nn.LSTM(x.shape[-1], HIDDEN, 1, batch_first=True)
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(single, f"{name}_l0").copy_(getattr(lstm, f"{name}_l{layer}"))
                x, _ = single(x)
                outputs.append(x.numpy())
    finally:
        torch.set_num_threads(threads)
    return outputs


def calibration_hessians(
    encoder: SpeakerEncoder, partials: np.ndarray, bounds: KernelBounds
) -> dict[int, np.ndarray]:
    """X^T X of [layer input x_t | h_{t-1}], as the int8 layers 1 and 2 see them (quantized
    with the pinned range), over every time step of the calibration partials."""
    hidden = layer_outputs(encoder, partials)
    hessians = {}
    for layer in (1, 2):
        x = hidden[layer - 1]
        h_prev = np.concatenate(
            [np.zeros_like(hidden[layer][:, :1]), hidden[layer][:, :-1]], axis=1
        )
        inputs = np.concatenate([x, h_prev], axis=2).reshape(-1, 2 * HIDDEN)
        inputs = fake_quantize(inputs, bounds).astype(np.float64)
        hessians[layer] = inputs.T @ inputs
    return hessians


# ------------------------------------------------------------------------ the graph


def build_model(
    encoder: SpeakerEncoder,
    bounds: KernelBounds,
    calibration: np.ndarray | None = None,
    quantize: bool = True,
) -> onnx.ModelProto:
    """The anchored encoder: fp32 first LSTM, then two int8 `DynamicQuantizeLSTM` (or fp32
    LSTMs with `quantize=False`, the same graph without quantization, for checks).

    `calibration` [n, 160, 40]: partials for GPTQ; None rounds weights to nearest.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers, linear_w, linear_b = encoder_weights(encoder)
    hessians = (
        calibration_hessians(encoder, calibration, bounds)
        if quantize and calibration is not None
        else {}
    )
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    h0, c0 = _anchor_states(bounds)
    nodes += [
        helper.make_node("Transpose", ["mels"], ["x0"], perm=[1, 0, 2], name="time_major"),
        helper.make_node("Shape", ["mels"], ["batch"], start=0, end=1, name="batch_size"),
        helper.make_node(
            "Concat",
            [
                const("one", np.array([1], np.int64)),
                "batch",
                const("padded", np.array([PADDED], np.int64)),
            ],
            ["state_shape"],
            axis=0,
            name="state_shape",
        ),
        helper.make_node(
            "Expand", [const("h0_anchor", h0), "state_shape"], ["h0"], name="initial_h"
        ),
        helper.make_node(
            "Expand", [const("c0_anchor", c0), "state_shape"], ["c0"], name="initial_c"
        ),
    ]
    const("axis1", np.array([1], np.int64))
    x = "x0"
    for index, layer in enumerate(layers):
        inputs = layer.w.shape[1] if index == 0 else PADDED
        w = _pad_gates(layer.w, inputs)
        r = _pad_gates(layer.r, PADDED)
        b = const(f"lstm{index}_bias", _anchor_bias(layer.bias, bounds)[None])
        last = index == len(layers) - 1
        # The last layer's sequence output is unused: only its final hidden state is.
        outputs = ["" if last else f"y{index}", f"y{index}_h", ""]
        if index == 0 or not quantize:
            nodes.append(
                helper.make_node(
                    "LSTM",
                    [
                        x,
                        const(f"lstm{index}_w", w[None]),
                        const(f"lstm{index}_r", r[None]),
                        b,
                        "",
                        "h0",
                        "c0",
                    ],
                    outputs,
                    hidden_size=PADDED,
                    name=f"lstm{index}",
                )
            )
        else:
            if index in hessians:
                wq, rq = gptq([layer.w, layer.r], hessians[index])
            else:
                wq, rq = round_to_nearest(layer.w), round_to_nearest(layer.r)
            qw, qr = _pad_quantized(wq, inputs), _pad_quantized(rq, PADDED)
            nodes.append(
                helper.make_node(
                    "DynamicQuantizeLSTM",
                    [
                        x,
                        const(f"lstm{index}_w_int8", qw.q.T[None].copy()),
                        const(f"lstm{index}_r_int8", qr.q.T[None].copy()),
                        b,
                        "",
                        "h0",
                        "c0",
                        "",
                        const(f"lstm{index}_w_scale", qw.scale[None]),
                        const(f"lstm{index}_w_zero_point", np.zeros((1, 4 * PADDED), np.int8)),
                        const(f"lstm{index}_r_scale", qr.scale[None]),
                        const(f"lstm{index}_r_zero_point", np.zeros((1, 4 * PADDED), np.int8)),
                    ],
                    outputs,
                    domain=MS_DOMAIN,
                    hidden_size=PADDED,
                    name=f"lstm{index}_int8",
                )
            )
        if not last:
            squeeze = helper.make_node("Squeeze", [f"y{index}", "axis1"], [f"x{index + 1}"])
            nodes.append(squeeze)
            x = f"x{index + 1}"
    linear = np.zeros((PADDED, EMBEDDING), dtype=np.float32)
    linear[:HIDDEN] = linear_w.T
    nodes += [
        helper.make_node(
            "Squeeze",
            ["y2_h", const("axis0", np.array([0], np.int64))],
            ["last"],
            name="last_hidden",
        ),
        helper.make_node("MatMul", ["last", const("linear_w", linear)], ["linear"], name="linear"),
        helper.make_node(
            "Add", ["linear", const("linear_b", linear_b)], ["biased"], name="linear_bias"
        ),
        helper.make_node("Relu", ["biased"], ["relu"], name="relu"),
        helper.make_node("ReduceL2", ["relu"], ["norm"], axes=[1], keepdims=1, name="norm"),
        helper.make_node("Div", ["relu", "norm"], ["embedding"], name="normalize"),
    ]
    graph = helper.make_graph(
        nodes,
        "ge2e_int8_invariant" if quantize else "ge2e_anchored_fp32",
        [
            helper.make_tensor_value_info(
                "mels", TensorProto.FLOAT, ["batch", PARTIAL_FRAMES, N_MELS]
            )
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBEDDING])],
        initializers,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    if quantize:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="voicegate-export")
    if not quantize:  # the checker does not know com.microsoft operators
        onnx.checker.check_model(model)
    return model


def _pad_quantized(matrix: QuantizedMatrix, columns: int) -> QuantizedMatrix:
    scale = np.ones((4, PADDED), dtype=np.float32)
    scale[:, :HIDDEN] = matrix.scale.reshape(4, HIDDEN)
    return QuantizedMatrix(_pad_gates(matrix.q, columns), scale.reshape(-1))


def partials_digest(partials: np.ndarray) -> str:
    """sha256 of the calibration partials (float32, C order): pins what GPTQ saw."""
    return hashlib.sha256(np.ascontiguousarray(partials, dtype=np.float32).tobytes()).hexdigest()
