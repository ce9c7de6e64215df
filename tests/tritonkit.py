"""Test helpers for the real Triton: tiny Python-backend models and process inspection."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

# The stand-in encoder, written into each model.py and exec'd here as the reference, so the
# expected values come from the very same code Triton runs. Each row depends only on its own
# partial, whatever Triton batched it with.
EMBED_SOURCE = '''
def embed(mels):
    """[n, 160, 40] -> [n, 256]: per-band means, tiled and weighted."""
    means = mels.mean(axis=1, dtype=np.float32)
    tiled = np.tile(means, (1, 7))[:, :256]
    return (tiled * (1.0 + np.arange(256, dtype=np.float32) / 256)).astype(np.float32)
'''

MODEL_SOURCE = (
    """
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils
"""
    + EMBED_SOURCE
    + """

class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        value = lambda key: params.get(key, {}).get("string_value", "")
        self.delay_s = float(value("delay_s") or 0)
        if value("init_delay_s"):
            time.sleep(float(value("init_delay_s")))
        if value("fail_init"):
            raise RuntimeError(value("fail_init"))

    def execute(self, requests):
        if self.delay_s:
            time.sleep(self.delay_s)
        responses = []
        for request in requests:
            mels = pb_utils.get_input_tensor_by_name(request, "mels").as_numpy()
            out = pb_utils.Tensor("embedding", embed(mels))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""
)


def reference_embed(mels: np.ndarray) -> np.ndarray:
    """What the test model returns for `mels` [n, 160, 40]."""
    namespace: dict[str, object] = {"np": np}
    exec(EMBED_SOURCE, namespace)
    return namespace["embed"](np.asarray(mels, dtype=np.float32))  # type: ignore[operator]


def write_model(
    repo: Path,
    name: str,
    *,
    max_batch_size: int = 8,
    backend: str = "python",
    **parameters: float | str,
) -> Path:
    """A Python-backend model `name`: input `mels` FP32 [160, 40] -> output `embedding` [256].

    `parameters` (delay_s, init_delay_s, fail_init) change its behaviour, see MODEL_SOURCE.
    """
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    params = "".join(
        f'parameters {{ key: "{key}" value {{ string_value: {json.dumps(str(value))} }} }}\n'
        for key, value in parameters.items()
    )
    (folder / "config.pbtxt").write_text(
        f'name: "{name}"\n'
        f'backend: "{backend}"\n'
        f"max_batch_size: {max_batch_size}\n"
        'input [ { name: "mels" data_type: TYPE_FP32 dims: [ 160, 40 ] } ]\n'
        'output [ { name: "embedding" data_type: TYPE_FP32 dims: [ 256 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 500 }\n"
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n" + params
    )
    if backend == "python":
        (folder / "1" / "model.py").write_text(MODEL_SOURCE)
    return folder


class ModelCounts(NamedTuple):
    """Triton's cumulative counters of one model."""

    requests: int  # inference requests that succeeded
    inferences: int  # batch items inferred (the requests' rows)
    executions: int  # model runs (one per batch)


async def model_counts(url: str, model: str) -> ModelCounts:
    """`model`'s counters in the Triton at gRPC `url`, from its statistics extension."""
    import tritonclient.grpc.aio as triton_grpc

    client = triton_grpc.InferenceServerClient(url)
    try:
        stats = await client.get_inference_statistics(model_name=model)
    finally:
        await client.close()
    (found,) = stats.model_stats
    return ModelCounts(
        requests=int(found.inference_stats.success.count),
        inferences=int(found.inference_count),
        executions=int(found.execution_count),
    )


def triton_available() -> bool:
    """The nvidia-pytriton wheel is installed (checked without importing it)."""
    return importlib.util.find_spec("pytriton") is not None


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, Z...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    return _state(pid) not in (None, "Z")


def group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (tritonserver and its Python stubs)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def processes_mentioning(fragment: str) -> list[int]:
    """Live processes whose command line contains `fragment` (e.g. a backend directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if fragment.encode() in cmdline and is_running(int(entry)):
                found.append(int(entry))
    return found


def shm_prefix(pid: int) -> str:
    """The Python backend's shared-memory prefix tritonserver `pid` was started with."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    key = "shm-region-prefix-name="
    return next((a.split(key, 1)[1] for a in args if key in a), "")


async def gone(fragment: str | None, pids: Sequence[int] = (), within_s: float = 2.0) -> bool:
    """True once no live process mentions `fragment` and none of `pids` runs, polling.

    An exiting process shows an empty command line before it turns zombie, hence `pids`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while (fragment and processes_mentioning(fragment)) or any(is_running(p) for p in pids):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def shm_regions(prefix: str) -> list[Path]:
    """The /dev/shm files whose names start with `prefix`."""
    return sorted(Path("/dev/shm").glob(f"{prefix}*"))
