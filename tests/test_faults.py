"""Triton killed under load: embedded (restarted by us) and external (it comes back by itself).

A steady stream of Embed calls runs against a front server of the test's own while its Triton
is SIGKILLed. Calls in flight and calls made while Triton is away must fail with UNAVAILABLE
and nothing else: the client deadline (10 s) is far longer than the outage's fast failures, so a
DEADLINE_EXCEEDED would mean a call hung on a dead backend, which is a bug. Health must turn
NOT_SERVING, then SERVING again, and calls succeed again without restarting the front server.
The time from the kill to the first successful call is printed and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api.voicegate.v1 import speaker_pb2, speaker_pb2_grpc
from server.config import Settings
from server.triton_process import EmbeddedTriton
from tests import speech
from tests.conftest import require_exported_models

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WORKERS = 3


@dataclasses.dataclass
class Outcome:
    started: float  # perf_counter when the call was made
    at: float  # perf_counter when it ended
    code: grpc.StatusCode
    details: str = ""


@dataclasses.dataclass
class Load:
    """Embed calls from WORKERS concurrent loops, and health polled every 50 ms."""

    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    health: list[tuple[float, int]] = dataclasses.field(default_factory=list)

    def successes_after(self, moment: float) -> list[Outcome]:
        """Successful calls made after `moment`."""
        return [o for o in self.outcomes if o.started > moment and o.code == grpc.StatusCode.OK]

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != grpc.StatusCode.OK]


@contextlib.asynccontextmanager
async def steady_load(port: int, audio: Any) -> AsyncIterator[Load]:
    load = Load()
    request = speaker_pb2.EmbedRequest(audio=audio)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def embed_loop() -> None:
            while True:
                began = time.perf_counter()
                try:
                    await stub.Embed(request, timeout=10)
                    load.outcomes.append(Outcome(began, time.perf_counter(), grpc.StatusCode.OK))
                except grpc.aio.AioRpcError as exc:
                    now = time.perf_counter()
                    load.outcomes.append(Outcome(began, now, exc.code(), exc.details() or ""))
                    await asyncio.sleep(0.02)  # a failing client backs off a little

        async def health_loop() -> None:
            while True:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if not load.health or load.health[-1][1] != reply.status:
                    load.health.append((time.perf_counter(), reply.status))
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(embed_loop()) for _ in range(WORKERS)]
        tasks.append(asyncio.create_task(health_loop()))
        try:
            yield load
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for(predicate: Any, within_s: float, what: str) -> None:
    deadline = time.perf_counter() + within_s
    while not predicate():
        assert time.perf_counter() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def kill_and_recover(load: Load, kill: Any, within_s: float = 120.0) -> float:
    """Let calls succeed, `kill()` Triton, wait for success again; seconds to recover."""
    await wait_for(lambda: len(load.successes_after(0)) >= 2 * WORKERS, 60, "calls to succeed")
    killed = time.perf_counter()
    kill()
    # Recovered: a call made after the outage was seen (a first failure) succeeds. Calls whose
    # answer was on its way at the kill may still succeed before that.
    await wait_for(load.failures, 30, "a failure after the kill")
    outage_seen = min(f.at for f in load.failures())
    await wait_for(lambda: load.successes_after(outage_seen), within_s, "a success again")
    recovered = min(o.at for o in load.successes_after(outage_seen)) - killed
    # Served steadily again: every worker's calls succeed.
    settled = time.perf_counter()
    await wait_for(lambda: len(load.successes_after(settled)) >= 2 * WORKERS, 30, "steady success")
    await wait_for(lambda: load.health[-1][1] == SERVING, 10, "health SERVING")

    failures = load.failures()
    assert failures, "killing Triton went unnoticed"
    assert {f.code for f in failures} == {grpc.StatusCode.UNAVAILABLE}, [
        (f.code, f.details) for f in failures
    ]
    assert all("Traceback" not in f.details for f in failures)
    late = [(round(f.at - killed, 3), f.details) for f in failures]
    assert all(0 <= at <= recovered + 1.0 for at, _ in late), (recovered, late)  # in the outage
    statuses = [status for at, status in load.health if at >= killed]
    assert statuses[:1] == [NOT_SERVING] and statuses[-1] == SERVING, load.health
    return recovered


async def test_embedded_triton_killed_under_load(
    base_settings: Settings, tmp_path: Path, speech_files: list[Path], report: Any
) -> None:
    from server.app import VoicegateApp

    require_exported_models()
    settings = base_settings.replace(state_dir=tmp_path, triton_url=None)
    async with (
        VoicegateApp(settings) as app,
        steady_load(app.port, speech.clip(speech_files[0])) as load,
    ):
        assert app.triton is not None
        url, pid = app.triton.grpc_url, app.triton.pid
        assert pid is not None
        recovered = await kill_and_recover(load, lambda: os.kill(pid, signal.SIGKILL))
        await app.triton.wait_ready(timeout=10)  # its own readiness poll may lag the clients'
        assert app.triton.restarts == 1 and app.triton.pid != pid
        assert app.triton.grpc_url == url
        failed = len(load.failures())
    report(
        f"embedded Triton SIGKILLed under load ({WORKERS} concurrent Embed loops): "
        f"first success {recovered:.2f} s after the kill, {failed} calls failed UNAVAILABLE"
    )


async def test_external_triton_killed_and_back_on_same_address(
    base_settings: Settings, tmp_path: Path, speech_files: list[Path], report: Any
) -> None:
    """An external Triton (here one we supervise ourselves, out of the front server's sight)
    dies and returns on the same address after a while: the front server reconnects alone."""
    from server.app import VoicegateApp

    require_exported_models()
    triton_settings = base_settings.replace(state_dir=tmp_path / "triton")
    # The outage lasts at least the restart delay (1.5-3 s) plus the models' load.
    async with EmbeddedTriton(
        triton_settings, models=list(base_settings.triton_models), restart_backoff_s=3.0
    ) as triton:
        url, pid = triton.grpc_url, triton.pid
        assert pid is not None
        settings = base_settings.replace(state_dir=tmp_path / "front", triton_url=url)
        async with (
            VoicegateApp(settings) as app,
            steady_load(app.port, speech.clip(speech_files[1])) as load,
        ):
            assert app.triton is None  # external: the front server starts none
            recovered = await kill_and_recover(load, lambda: os.kill(pid, signal.SIGKILL))
            failed = len(load.failures())
        await triton.wait_ready(timeout=10)
        assert triton.grpc_url == url and triton.restarts == 1
    report(
        f"external Triton SIGKILLed under load, back on the same address after a 1.5-3 s "
        f"restart delay: first success {recovered:.2f} s after the kill, {failed} calls "
        f"failed UNAVAILABLE"
    )
