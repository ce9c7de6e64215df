"""Triton `config.pbtxt` text for each exported model, for both deployment targets.

The text is built from constants only (no timestamps, no live measurements), so regenerating a
repository gives byte-identical committed files; `parse_config` checks it with Triton's own
protobuf schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from export.onnx_export import INPUT_NAME, N_MELS, OUTPUT_NAME, PARTIAL_FRAMES
from server import vad_model

MAX_BATCH_SIZE = 64
FRAMES, MELS, EMBEDDING = PARTIAL_FRAMES, N_MELS, 256
# Silero VAD (export/vad.py): frames of 64 context + 512 new samples, LSTM state h and c of 128.
VAD_MODEL = vad_model.MODEL_NAME
VAD_FRAME_WIDTH, VAD_HIDDEN = vad_model.FRAME_WIDTH, vad_model.HIDDEN


@dataclass(frozen=True)
class Batching:
    """How one target's models batch and run; `reason` is written above the settings."""

    queue_delay_us: int
    instances: int
    kind: str
    intra_op_threads: int | None  # None: the backend's own default
    reason: tuple[str, ...]


CPU_BATCHING = Batching(
    queue_delay_us=0,
    instances=2,
    kind="KIND_CPU",
    intra_op_threads=1,
    reason=(
        "Batching: ORT partials/s measured with `python -m export.throughput` on the 2-core dev",
        "machine (ORT 1.32, median of 3 x 1 s; another job took one core in part of the runs):",
        "  batch               1     8    32    64",
        "  int8, 1 thread    241   420   398   397   (fp32: 117  220  206  209)",
        "  int8, 2 threads   325   792   785     -   other core idle (fp32: 207  416  391  399)",
        "  int8, 2 threads   110   305   343   352   other core busy (250 at 64, spread 87 %)",
        "One thread saturates at batch 8 and keeps its rate when the other core is busy; two",
        "threads double it only on an idle machine and fall below one thread when they share a",
        "core: one thread per instance. End to end (`python -m benchmarks.sweep`, 4 s clips,",
        "6 interleaved rounds, same-run ratios), 2 instances with no queue delay served",
        "x1.12 / x1.14 / x1.27 the utterances/s of 1 instance with a 1 ms delay at client",
        "concurrency 1 / 8 / 32: one instance with one thread leaves half a core idle (the",
        "front server needs ~0.5 core at 110 utt/s), and an utterance already brings 3-13",
        "partials, so waiting to merge requests buys less than running two at once. The int8",
        "model is batch-invariant, so how requests are merged never changes an embedding.",
    ),
)

GPU_BATCHING = Batching(
    queue_delay_us=2000,
    instances=1,
    kind="KIND_GPU",
    intra_op_threads=None,
    reason=(
        "Batching: not measured with ONNX Runtime's CUDA provider (none was at hand). Proxy:",
        "the same network in torch 2.11 + cuDNN on an H100 took 7.6 / 7.4 / 8.4 / 9.2 ms per",
        "batch of 1 / 8 / 32 / 64 in fp32 (7.1 to 8.8 ms in fp16): 160 sequential LSTM steps",
        "cost the same at any batch size, so a 2 ms wait to fill batches multiplies throughput",
        "for little latency. Tune it with perf_analyzer in the NGC container.",
    ),
)

# Silero VAD. Figures: `python -m benchmarks.vad_model` (benchmarks/README.md, "Silero VAD").
VAD_CPU_BATCHING = Batching(
    queue_delay_us=0,
    instances=1,
    kind="KIND_CPU",
    intra_op_threads=1,
    reason=(
        "Batching: a frame costs ~60 us of one core in ORT, a Triton request ~1 ms of CPU",
        "(client, gRPC, Python backend), so the front server sends windows of 64 frames (2 s",
        "of audio; CPU per frame 1.5x the in-process model's, 1 frame per request 16x).",
        "Windows that queue while the instance runs go together into its next run (same W,",
        "rows independent), so no queue delay: waiting for batch-mates would cost latency",
        "and save no CPU. One instance, one thread: the encoders need the other core.",
    ),
)

VAD_GPU_BATCHING = Batching(
    queue_delay_us=500,
    instances=1,
    kind="KIND_GPU",
    intra_op_threads=None,
    reason=(
        "Batching: not measured with ONNX Runtime's CUDA provider (none was at hand). Proxy:",
        "the same network in torch 2.11 + cuDNN on an H100 took 0.52-0.59 ms per batch for",
        "any window of 1-64 frames and 1-32 windows (0.77 ms at 64 x 64): launch-bound, so",
        "throughput grows with the batch. A 0.5 ms wait, one run's time, fills batches for",
        "little latency (a 64-frame window holds 2 s of audio). Tune with perf_analyzer.",
    ),
)

DESCRIPTIONS = {
    "ge2e_int8": (
        "GE2E speaker encoder, int8 and batch-invariant: ONNX Runtime's int8 LSTM with its",
        "activation ranges pinned by two anchor units per layer (an embedding does not depend",
        "on its batch-mates), GPTQ-rounded per-channel int8 weights; the first LSTM stays fp32",
        "because its power-mel input does not survive per-tensor uint8 scaling.",
        "See export/int8_invariant.py and 1/export_report.json.",
    ),
    "ge2e_fp32": ("GE2E speaker encoder, fp32 (the reference precision).",),
    "ge2e_fp16": (
        "GE2E speaker encoder, fp16 weights and compute with fp32 input and output, on ONNX",
        "Runtime's CUDA provider (its dynamic int8 operators have no CUDA kernels).",
    ),
    "ge2e_trt_fp16": (
        "GE2E speaker encoder, the fp32 ONNX run by ONNX Runtime's TensorRT provider, which",
        "builds an FP16 engine at load (the first load takes a while: the engine is cached).",
    ),
    VAD_MODEL: (
        "Silero VAD 16 kHz (silero-vad 6.2.3), fp32: one speech probability per 32 ms frame.",
        "A request is one window of W consecutive frames of one stream (512 new samples after",
        "the previous frame's last 64) and that stream's LSTM state; the front server carries",
        "state_out into the stream's next window. Rows of a batch never mix (checked at export).",
        "See export/vad.py and 1/export_report.json.",
    ),
}

# The gpu target's TensorRT variant: ONNX Runtime's TensorRT execution provider inside
# Triton's onnxruntime backend. One optimisation profile covers every batch size up to
# max_batch_size, so a new batch size never triggers an engine rebuild.
TENSORRT_FP16 = {
    "precision_mode": "FP16",
    "max_workspace_size_bytes": str(1 << 30),
    "trt_engine_cache_enable": "1",
    "trt_engine_cache_path": "/tmp/voicegate_trt_cache",  # mount a volume to keep it
    "trt_profile_min_shapes": f"{INPUT_NAME}:1x{FRAMES}x{MELS}",
    "trt_profile_opt_shapes": f"{INPUT_NAME}:32x{FRAMES}x{MELS}",
    "trt_profile_max_shapes": f"{INPUT_NAME}:{MAX_BATCH_SIZE}x{FRAMES}x{MELS}",
}
GPU_ACCELERATORS = {"ge2e_trt_fp16": ("tensorrt", TENSORRT_FP16)}


def _tensors(kind: str, tensors: list[tuple[str, list[int]]]) -> tuple[str, ...]:
    lines = [f"{kind} ["]
    for index, (tensor, dims) in enumerate(tensors):
        lines += [
            "  {",
            f'    name: "{tensor}"',
            "    data_type: TYPE_FP32",
            f"    dims: [ {', '.join(str(d) for d in dims)} ]",
            "  }" + ("," if index < len(tensors) - 1 else ""),
        ]
    return (*lines, "]")


ENCODER_IO = (
    "# One request is one utterance's partials [n, 160, 40], n <= max_batch_size.",
    *_tensors("input", [(INPUT_NAME, [FRAMES, MELS])]),
    *_tensors("output", [(OUTPUT_NAME, [EMBEDDING])]),
)
VAD_IO = (
    "# One request is one stream's window [1, W, 576] with its state [1, 2, 128]; the",
    "# batcher merges windows of the same W from different streams (W = -1: any length).",
    *_tensors(
        "input",
        [
            (vad_model.FRAMES_INPUT, [-1, VAD_FRAME_WIDTH]),
            (vad_model.STATE_INPUT, [2, VAD_HIDDEN]),
        ],
    ),
    *_tensors(
        "output",
        [(vad_model.PROBS_OUTPUT, [-1]), (vad_model.STATE_OUTPUT, [2, VAD_HIDDEN])],
    ),
)


@dataclass(frozen=True)
class ModelSpec:
    """What differs between models in their configs: batching per target, inputs/outputs."""

    cpu: Batching
    gpu: Batching
    io: tuple[str, ...]


ENCODER_SPEC = ModelSpec(cpu=CPU_BATCHING, gpu=GPU_BATCHING, io=ENCODER_IO)
# Models that are not GE2E encoders; every other name is one.
MODEL_SPECS = {VAD_MODEL: ModelSpec(cpu=VAD_CPU_BATCHING, gpu=VAD_GPU_BATCHING, io=VAD_IO)}


def model_spec(name: str) -> ModelSpec:
    return MODEL_SPECS.get(name, ENCODER_SPEC)


def cpu_config(name: str, batching: Batching | None = None) -> str:
    """A Python-backend model that runs its `model.onnx` with ONNX Runtime (see model.py)."""
    batching = batching or model_spec(name).cpu
    threads = batching.intra_op_threads or 1
    return _config(
        name,
        header=(
            'backend: "python"',
            "# model.py runs 1/model.onnx with ONNX Runtime on CPU: the Triton bundled in the",
            "# nvidia-pytriton wheel has only the Python backend.",
        ),
        batching=batching,
        parameters={
            "intra_op_thread_count": str(threads),
            "inter_op_thread_count": "1",
            "execution_mode": "0",
        },
    )


def gpu_config(name: str, batching: Batching | None = None) -> str:
    """A model for Triton's native ONNX Runtime backend (NGC container) on the GPU."""
    batching = batching or model_spec(name).gpu
    accelerator = GPU_ACCELERATORS.get(name)
    return _config(
        name,
        header=('platform: "onnxruntime_onnx"',),
        batching=batching,
        parameters={},
        footer=_accelerator(*accelerator) if accelerator else (),
    )


def _accelerator(name: str, parameters: dict[str, str]) -> tuple[str, ...]:
    return (
        "optimization {",
        "  execution_accelerators {",
        "    gpu_execution_accelerator [",
        "      {",
        f'        name: "{name}"',
        *(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in parameters.items()),
        "      }",
        "    ]",
        "  }",
        "}",
    )


def parse_config(text: str) -> Any:
    """`ModelConfig` message of a config.pbtxt; raises text_format.ParseError when invalid."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _config(
    name: str,
    header: tuple[str, ...],
    batching: Batching,
    parameters: dict[str, str],
    footer: tuple[str, ...] = (),
) -> str:
    lines = [
        "# Generated by export/triton_config.py (voicegate export): edit that, not this file.",
        *(f"# {line}" for line in DESCRIPTIONS[name]),
        f'name: "{name}"',
        *header,
        f"max_batch_size: {MAX_BATCH_SIZE}",
        *model_spec(name).io,
        *(f"# {line}" for line in batching.reason),
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {batching.queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {batching.instances}",
        f"    kind: {batching.kind}",
        "  }",
        "]",
    ]
    for key, value in parameters.items():
        lines += ["parameters {", f'  key: "{key}"', f'  value: {{ string_value: "{value}" }}', "}"]
    lines += footer
    return "\n".join(lines) + "\n"
