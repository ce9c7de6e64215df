"""Shared fixtures: dev speech, and the real Triton and front server on free ports."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from export.devdata import resolve_data_dir
from server.config import Settings

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "model_repository"
NODE_DIR = ROOT / "examples" / "node"
# Written by the Makefile's `npm ci` rule, and by the node_modules fixture below.
NODE_INSTALLED = NODE_DIR / "node_modules" / ".installed"


def dev_data_dir() -> Path | None:
    """Dev speech (export.devdata.resolve_data_dir: VOICEGATE_DATA_DIR, default
    ../shared/data beside the project), when it holds FLAC files."""
    path = resolve_data_dir(None)
    return path if path is not None and any(path.glob("*.flac")) else None


# Figures a test measured (recovery times, ...), printed again in pytest's terminal summary so
# that they show without -s. Append with the `report` fixture.
REPORT_LINES: list[str] = []


@pytest.fixture(scope="session")
def report() -> Callable[[str], None]:
    """`report("what: figure")` prints the line now and again in the terminal summary."""

    def add(line: str) -> None:
        print(f"\n{line}")
        REPORT_LINES.append(line)

    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORT_LINES:
        terminalreporter.section("measured")
        for line in REPORT_LINES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = dev_data_dir()
    if path is None:
        pytest.skip(
            "no development speech: set VOICEGATE_DATA_DIR to a folder of LibriSpeech FLAC "
            "files (default ../shared/data/librispeech-train-clean-100)"
        )
    return path


@pytest.fixture(scope="session")
def speech_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("*.flac"))


def require_exported_models() -> None:
    missing = [
        name
        for name in ("ge2e_int8", "ge2e_fp32", "silero_vad")
        if not (MODEL_REPOSITORY / name / "1" / "model.onnx").exists()
    ]
    if missing:
        pytest.fail(f"models not exported: {missing}; run `make export` (make test does it)")


@pytest.fixture(scope="session")
def base_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings.load(
        {
            "host": "127.0.0.1",
            "port": 0,
            "model_repository": MODEL_REPOSITORY,
            "state_dir": tmp_path_factory.mktemp("state"),
            "grace_seconds": 2.0,
            "health_poll_s": 0.2,
            # Prometheus off: apps of their own run beside the session's (observability's
            # traced_app serves it on a free port of its own).
            "metrics_port": 0,
            # Tests drive up to 26 concurrent calls at the engine; admission has its own tests.
            "max_inflight_requests": 64,
        },
        environ={},
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def triton(base_settings: Settings) -> AsyncIterator[object]:
    """The real Triton from the nvidia-pytriton wheel, serving the exported models."""
    from server.triton_process import EmbeddedTriton

    require_exported_models()
    async with EmbeddedTriton(base_settings, models=list(base_settings.triton_models)) as server:
        yield server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def app(base_settings: Settings, triton: object) -> AsyncIterator[object]:
    """The real front server, using the session's Triton as an external one."""
    from server.app import VoicegateApp

    settings = base_settings.replace(triton_url=triton.grpc_url)  # type: ignore[attr-defined]
    async with VoicegateApp(settings) as running:
        yield running


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def channel(app: object) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as open_channel:  # type: ignore[attr-defined]
        yield open_channel


@pytest.fixture(scope="session")
def speaker_stub(channel: grpc.aio.Channel) -> object:
    from server.api.voicegate.v1 import speaker_pb2_grpc

    return speaker_pb2_grpc.SpeakerServiceStub(channel)


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """examples/node's locked packages (buf, @grpc/grpc-js...), installed with `npm ci` unless
    `make` did (its marker file); skips without Node.js."""
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed: the Node packages (buf, the client) cannot run")
    if not NODE_INSTALLED.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("node is installed but npm is not: cannot install examples/node")
        subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
        NODE_INSTALLED.touch()
    return NODE_INSTALLED.parent


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A real PostgreSQL server for the session (tests/postgres.py); skips without binaries."""
    from tests import postgres

    bin_dir = postgres.find_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
            "/usr/lib/postgresql/*/bin; install the postgresql package (.ci/run does)"
        )
    with postgres.postgres_server(bin_dir) as server:
        yield server.url
