"""The embedded Triton and its client, against the real tritonserver of the nvidia-pytriton wheel.

One Triton serves the module (tiny Python-backend models written into tmp_path); the tests that
must start their own (stop, start-up failures) use short-lived ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from tritonclient.utils import InferenceServerException

from server.config import Settings
from server.errors import BackendUnavailable, DeadlineExceeded
from server.triton_client import TritonEncoder, map_triton_error
from server.triton_process import EmbeddedTriton, free_ports
from tests import tritonkit

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not tritonkit.triton_available(), reason="nvidia-pytriton not installed"),
]

MODELS = ["enc", "slow"]
ROOT = Path(__file__).resolve().parents[1]


def settings_for(repo: Path, state: Path, **changes: object) -> Settings:
    return Settings.load(
        {"model_repository": repo, "state_dir": state, "triton_startup_timeout_s": 60.0, **changes},
        environ={},
    )


def mels(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n, 160, 40), dtype=np.float32) * 10


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    tritonkit.write_model(root, "enc", max_batch_size=8)
    tritonkit.write_model(root, "slow", max_batch_size=8, delay_s=0.5)
    tritonkit.write_model(root, "unloaded", max_batch_size=8)
    # A config this binary cannot serve (no ONNX Runtime backend in the wheel): never loaded.
    tritonkit.write_model(root, "onnx_only", backend="onnxruntime")
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def triton(
    repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EmbeddedTriton]:
    settings = settings_for(repo, tmp_path_factory.mktemp("state"))
    began = time.perf_counter()
    async with EmbeddedTriton(settings, models=MODELS, restart_backoff_s=0.2) as server:
        print(f"\nTriton start (2 Python-backend models): {time.perf_counter() - began:.2f}s")
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def encoder(triton: EmbeddedTriton) -> AsyncIterator[TritonEncoder]:
    async with TritonEncoder(triton.grpc_url, timeout_s=10.0) as client:
        triton.on_url_change(client.set_url)
        yield client


async def test_started_and_ready(triton: EmbeddedTriton, encoder: TritonEncoder) -> None:
    host, _, port = triton.grpc_url.rpartition(":")
    assert host == "127.0.0.1"
    assert len({int(port), triton.http_port, triton.metrics_port}) == 3
    assert triton.is_ready() and triton.pid is not None
    await triton.wait_ready(timeout=0.1)
    assert await encoder.is_ready(MODELS)
    assert not await encoder.is_ready(["enc", "unloaded"])
    assert not await encoder.is_ready(["onnx_only"])
    assert "enc" in triton.log_path.read_text()


async def test_embed_partials_values(encoder: TritonEncoder) -> None:
    partials = mels(3)
    out = await encoder.embed_partials(partials, "enc")
    assert out.shape == (3, 256) and out.dtype == np.float32
    assert out.flags.writeable
    np.testing.assert_allclose(out, tritonkit.reference_embed(partials), rtol=1e-6)


async def test_embed_no_partials(encoder: TritonEncoder) -> None:
    out = await encoder.embed_partials(np.zeros((0, 160, 40), np.float32), "enc")
    assert out.shape == (0, 256)


async def test_embed_rejects_bad_shape(encoder: TritonEncoder) -> None:
    with pytest.raises(ValueError, match="partials must be"):
        await encoder.embed_partials(np.zeros((2, 100, 40), np.float32), "enc")


async def test_chunks_only_above_max_batch_size(encoder: TritonEncoder) -> None:
    async def request_count() -> int:
        return (await tritonkit.model_counts(encoder.url, "enc")).requests

    before = await request_count()
    partials = mels(8, seed=1)
    np.testing.assert_allclose(
        await encoder.embed_partials(partials, "enc"),
        tritonkit.reference_embed(partials),
        rtol=1e-6,
    )
    assert await request_count() - before == 1  # n == max_batch_size: one request

    before = await request_count()
    partials = mels(19, seed=2)
    out = await encoder.embed_partials(partials, "enc")
    np.testing.assert_allclose(out, tritonkit.reference_embed(partials), rtol=1e-6)
    assert await request_count() - before == 3  # 8 + 8 + 3
    assert await encoder.max_batch_size("enc") == 8


async def test_concurrent_calls_are_batched_correctly(encoder: TritonEncoder) -> None:
    batches = [mels(1 + i % 5, seed=10 + i) for i in range(40)]
    outs = await asyncio.gather(*(encoder.embed_partials(b, "enc") for b in batches))
    for batch, out in zip(batches, outs, strict=True):
        np.testing.assert_allclose(out, tritonkit.reference_embed(batch), rtol=1e-6)


async def test_generic_infer_with_headers(encoder: TritonEncoder) -> None:
    partials = mels(2, seed=3)
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    out = await encoder.infer("enc", {"mels": partials}, ["embedding"], headers=headers)
    np.testing.assert_allclose(out["embedding"], tritonkit.reference_embed(partials), rtol=1e-6)


async def test_deadline_exceeded(encoder: TritonEncoder) -> None:
    began = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        await encoder.embed_partials(mels(1), "slow", timeout_s=0.1)
    assert time.perf_counter() - began < 0.4
    with pytest.raises(DeadlineExceeded):
        await encoder.embed_partials(mels(1), "enc", timeout_s=0.0)


@pytest.mark.parametrize("model", ["missing", "unloaded", "onnx_only"])
async def test_model_not_served_is_backend_unavailable(encoder: TritonEncoder, model: str) -> None:
    with pytest.raises(BackendUnavailable) as info:
        await encoder.embed_partials(mels(1), model)
    assert info.value.message.startswith("inference backend unavailable: model")
    with pytest.raises(BackendUnavailable):
        await encoder.infer(model, {"mels": mels(1)}, ["embedding"])


async def test_other_errors_are_not_mapped(encoder: TritonEncoder) -> None:
    wrong_dtype = mels(1).astype(np.float64)
    with pytest.raises(InferenceServerException) as info:
        await encoder.infer("enc", {"mels": wrong_dtype}, ["embedding"])
    assert "INVALID_ARGUMENT" in str(info.value.status())


def test_error_mapping_table() -> None:
    def mapped(status: str, msg: str) -> Exception:
        return map_triton_error(InferenceServerException(msg, f"StatusCode.{status}"), "enc")

    refused = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: refused"
    assert str(mapped("UNAVAILABLE", refused)) == "inference backend unavailable: cannot connect"
    assert isinstance(mapped("DEADLINE_EXCEEDED", "Deadline Exceeded"), DeadlineExceeded)
    assert isinstance(mapped("NOT_FOUND", "unknown model"), BackendUnavailable)
    assert isinstance(mapped("CANCELLED", "Channel closed"), BackendUnavailable)
    internal = InferenceServerException("boom", "StatusCode.INTERNAL")
    assert map_triton_error(internal) is internal


async def test_latency(encoder: TritonEncoder) -> None:
    for n in (1, 7):
        partials = mels(n)
        await encoder.embed_partials(partials, "enc")
        samples = []
        for _ in range(100):
            began = time.perf_counter()
            await encoder.embed_partials(partials, "enc")
            samples.append(time.perf_counter() - began)
        median_ms = statistics.median(samples) * 1000
        p95_ms = sorted(samples)[94] * 1000
        print(f"\nembed_partials n={n}: median {median_ms:.2f} ms, p95 {p95_ms:.2f} ms")


async def wait_recovered(encoder: TritonEncoder, began: float, limit_s: float = 30.0) -> float:
    """Seconds from `began` until an embed call succeeds again."""
    partials = mels(2, seed=4)
    while True:
        try:
            out = await encoder.embed_partials(partials, "enc", timeout_s=2.0)
        except BackendUnavailable:
            assert time.perf_counter() - began < limit_s, "Triton did not come back"
            await asyncio.sleep(0.02)
            continue
        np.testing.assert_allclose(out, tritonkit.reference_embed(partials), rtol=1e-6)
        return time.perf_counter() - began


async def test_sigkill_is_restarted_on_same_ports(
    triton: EmbeddedTriton, encoder: TritonEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="server.triton_process")
    url, restarts, old_pid = triton.grpc_url, triton.restarts, triton.pid
    assert old_pid is not None
    old_group = tritonkit.group_members(old_pid)
    assert len(old_group) >= 3  # tritonserver and one stub per model

    began = time.perf_counter()
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(BackendUnavailable):  # down: callers get UNAVAILABLE, fast
        for _ in range(50):
            await encoder.embed_partials(mels(1), "enc", timeout_s=2.0)
            await asyncio.sleep(0.01)
    recovered = await wait_recovered(encoder, began)
    print(f"\nrecovery after SIGKILL: {recovered:.2f}s")

    await triton.wait_ready(timeout=5)
    assert triton.restarts == restarts + 1
    assert triton.grpc_url == url
    assert triton.pid not in (None, old_pid)
    assert await tritonkit.gone(None, pids=old_group)  # the old stubs are gone too
    assert any("restarting tritonserver" in r.getMessage() for r in caplog.records)


async def test_restart_moves_when_port_is_taken(
    triton: EmbeddedTriton, encoder: TritonEncoder
) -> None:
    url, old_pid = triton.grpc_url, triton.pid
    assert old_pid is not None
    seen: list[str] = []
    triton.on_url_change(seen.append)
    squatter = socket.socket()
    # Our clients' connections leave TIME_WAIT entries on that port; Triton binds past them too.
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        began = time.perf_counter()
        os.kill(old_pid, signal.SIGKILL)
        # Take its gRPC port before the supervisor's backoff (>= 0.1 s here) ends: it sees the
        # port taken and moves at once.
        while True:
            try:
                squatter.bind(("127.0.0.1", int(url.rpartition(":")[2])))
                break
            except OSError:
                assert time.perf_counter() - began < 0.1, "port not released in time"
                await asyncio.sleep(0.002)
        squatter.listen()
        recovered = await wait_recovered(encoder, began)
        print(f"\nrecovery after SIGKILL with its port taken: {recovered:.2f}s")
    finally:
        squatter.close()
    assert triton.grpc_url != url
    assert seen == [triton.grpc_url]
    assert encoder.url == triton.grpc_url


async def test_port_clash_seen_by_triton_is_retried(tmp_path: Path) -> None:
    # extra_args come last, so Triton binds this taken port on every try: the clash is only
    # found in its log (the pre-check passes our own ports), retried, then reported.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        settings = settings_for(tmp_path / "repo", tmp_path / "state")
        (tmp_path / "repo").mkdir()
        server = EmbeddedTriton(settings, models=[], extra_args=[f"--metrics-port={taken}"])
        with pytest.raises(BackendUnavailable, match="already in use"):
            await server.start()
    assert server.log_path.read_text().count("=== voicegate launch") == 3


async def test_closed_port_is_unavailable() -> None:
    async with TritonEncoder(f"127.0.0.1:{free_ports(1)[0]}", timeout_s=5.0) as client:
        assert not await client.is_ready(["enc"])
        with pytest.raises(BackendUnavailable) as info:
            await client.embed_partials(mels(1), "enc")
        assert info.value.message == "inference backend unavailable: cannot connect"
        with pytest.raises(BackendUnavailable):
            await client.infer("enc", {"mels": mels(1)}, ["embedding"])
    assert not await client.is_ready(["enc"])  # closed client: still never raises


async def test_stop_leaves_no_process(repo: Path, tmp_path: Path) -> None:
    server = EmbeddedTriton(settings_for(repo, tmp_path), models=["enc"])
    await server.start()
    pid = server.pid
    assert pid is not None
    group = tritonkit.group_members(pid)
    assert len(group) >= 2  # tritonserver and the model's stub
    backend_dir = str(tmp_path / "triton")
    assert set(tritonkit.processes_mentioning(backend_dir)) >= set(group)
    prefix = tritonkit.shm_prefix(pid)
    shm = tritonkit.shm_regions(prefix)
    assert prefix and shm

    began = time.perf_counter()
    await asyncio.gather(server.stop(timeout=5), server.stop(timeout=5))  # concurrent: shared
    print(f"\nstop (SIGTERM, Triton unloads the model): {time.perf_counter() - began:.2f}s")
    assert await tritonkit.gone(backend_dir, pids=group)
    assert not [p for p in shm if p.exists()]
    assert server.pid is None and not server.is_ready()
    await server.stop()  # idempotent
    with pytest.raises(BackendUnavailable):
        await server.wait_ready(timeout=0.1)


ORPHAN_SCRIPT = """
import asyncio, sys
from server.config import Settings
from server.triton_process import EmbeddedTriton

async def main():
    overrides = {"model_repository": sys.argv[1], "state_dir": sys.argv[2]}
    triton = EmbeddedTriton(Settings.load(overrides, environ={}), models=["enc"])
    await triton.start()
    print(triton.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_triton_dies_with_its_parent(repo: Path, tmp_path: Path) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ORPHAN_SCRIPT,
        str(repo),
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        line = await asyncio.wait_for(parent.stdout.readline(), 60)  # type: ignore[union-attr]
        pid = int(line)
        assert tritonkit.is_running(pid)
    finally:
        parent.kill()  # SIGKILL: no cleanup code of ours runs
        await parent.wait()
    # PR_SET_PDEATHSIG sends Triton SIGTERM; it unloads its model and exits (about 2-3 s).
    assert await tritonkit.gone(str(tmp_path), pids=[pid], within_s=15)


@pytest.mark.parametrize(
    ("model", "fail_init", "expected"),
    [
        ("broken", "boom: weights unreadable", "boom: weights unreadable"),
        ("absent", None, "absent"),  # no such folder in the repository
    ],
)
async def test_startup_failure_reports_log_tail(
    tmp_path: Path, model: str, fail_init: str | None, expected: str
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    if fail_init is not None:
        tritonkit.write_model(repo, model, fail_init=fail_init)
    server = EmbeddedTriton(settings_for(repo, tmp_path / "state"), models=[model])
    began = time.perf_counter()
    with pytest.raises(BackendUnavailable) as info:
        async with server:
            pass
    message = info.value.message
    print(f"\nfailed start ({model}) reported in {time.perf_counter() - began:.2f}s")
    assert "embedded Triton failed to start: tritonserver exited" in message
    assert expected in message.split("--- last lines of", 1)[1]
    assert server.pid is None
    # The stubs got SIGKILL with their group; give the kernel a moment to finish them.
    assert await tritonkit.gone(str(tmp_path / "state"))


async def test_startup_timeout(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    tritonkit.write_model(repo, "sleepy", init_delay_s=30)
    settings = settings_for(repo, tmp_path / "state", triton_startup_timeout_s=1.0)
    server = EmbeddedTriton(settings, models=["sleepy"])
    began = time.perf_counter()
    with pytest.raises(BackendUnavailable, match=r"not ready within 1s"):
        await server.start()
    assert time.perf_counter() - began < 5
    assert server.pid is None
    # The stubs got SIGKILL with their group; give the kernel a moment to finish them.
    assert await tritonkit.gone(str(tmp_path / "state"))
    await server.stop()
