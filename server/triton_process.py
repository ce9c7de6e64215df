"""The embedded Triton: the `tritonserver` binary of the nvidia-pytriton wheel, run and supervised.

The wheel carries a real Triton Inference Server with only the Python backend. We run its binary
directly (pytriton itself is never imported), wait until every configured model is ready, and
restart the server with exponential backoff if it dies, keeping its ports when we can so that
clients reconnect without noticing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import itertools
import logging
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from server.config import Settings
from server.errors import BackendUnavailable
from server.triton_client import TritonClient

log = logging.getLogger(__name__)

_LOG_TAIL_LINES = 25
_PORT_TRIES = 3
# Triton's words when a port is taken (gRPC: "Socket '...' already in use", HTTP/metrics alike).
_BIND_ERRORS = ("already in use", "address in use")
_SHM_DIR = Path("/dev/shm")
# Loopback only: Triton's API can load and unload models and has no auth.
_HOST = "127.0.0.1"
_RESTART_BACKOFF_MAX_S = 30.0
_HEALTHY_AFTER_S = 60.0  # a server up this long starts the restart backoff over
# How long after a launch answers ready its log is checked for an endpoint that failed to start.
_SETTLE_S = 0.25
_ENDPOINT_FAILURE = re.compile(r"failed to start \w+ service", re.IGNORECASE)  # main.cc's words
_instances = itertools.count(1)

UrlListener = Callable[[str], object]


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    """Where the nvidia-pytriton wheel keeps the server, its libraries and the Python backend."""

    binary: Path
    libs: Path
    python_backend: Path
    stub: Path


def find_triton_install() -> TritonInstall:
    """Locate the wheel's Triton without importing pytriton (its import is slow and noisy)."""
    spec = importlib.util.find_spec("pytriton")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise BackendUnavailable(
            "embedded Triton is not installed: install nvidia-pytriton (voicegate[triton]) "
            "or set triton_url to an external Triton"
        )
    package = Path(locations[0])
    root = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        libs=package.parent / "nvidia_pytriton.libs",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    for path in (install.binary, install.libs, install.python_backend, install.stub):
        if not path.exists():
            raise BackendUnavailable(f"embedded Triton is incomplete: {path} is missing")
    return install


def prepare_backend_directory(install: TritonInstall, state_dir: Path) -> Path:
    """A `--backend-directory` holding the wheel's Python backend plus the stub for this Python.

    Built once under `state_dir` and reused; built aside and renamed so that two servers starting
    at once never see a half-copied folder.
    """
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    backends = state_dir / "triton" / f"backends-py{version}"
    python_dir = backends / "python"
    wanted = {p.name: p for p in install.python_backend.iterdir() if p.is_file()}
    wanted[install.stub.name] = install.stub
    if python_dir.is_dir() and all(
        (python_dir / name).is_file() and (python_dir / name).stat().st_size == src.stat().st_size
        for name, src in wanted.items()
    ):
        return backends
    backends.parent.mkdir(parents=True, exist_ok=True)
    staging = backends.parent / f".{backends.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "python").mkdir(parents=True)
    for name, src in wanted.items():
        shutil.copy2(src, staging / "python" / name)  # copy2 keeps the stub's exec bit
    shutil.rmtree(backends, ignore_errors=True)
    try:
        staging.rename(backends)
    except OSError:
        # Another process renamed its identical copy first: use that one.
        shutil.rmtree(staging, ignore_errors=True)
    return backends


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free right now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


# Runs between our fork and Triton's exec, in a fresh interpreter (-I -S: no site, ~15 ms), so
# that no Python code runs in a forked copy of this multi-threaded process (preexec_fn would force
# fork() instead of vfork(), which is unsafe with threads and trips gRPC's fork handlers).
# PR_SET_PDEATHSIG survives the exec: Triton gets SIGTERM when the thread that started it, the
# event loop's, dies; Triton then stops its Python stubs itself.
_LAUNCHER = """
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM)) != 0:
    sys.exit("prctl(PR_SET_PDEATHSIG) failed")
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # our parent died before prctl took effect
os.execv(sys.argv[2], sys.argv[2:])
"""


def _launch_command(command: list[str]) -> list[str]:
    """`command`, behind the death-signal launcher where the OS has one (Linux)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *command]


def ports_free(ports: Sequence[int], host: str = "127.0.0.1") -> bool:
    """Whether we could bind every port now (as Triton would: SO_REUSEADDR past TIME_WAIT)."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


class _StartFailure(Exception):
    """One launch that did not become ready; `port_clash` asks for other ports."""

    def __init__(self, reason: str, tail: str, port_clash: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tail = tail
        self.port_clash = port_clash


class EmbeddedTriton:
    """Runs and supervises the wheel's `tritonserver` on loopback ports.

    Usage: `async with EmbeddedTriton(settings, models=[...]) as triton: ... triton.grpc_url`.
    The ports are chosen when it is made, so `grpc_url` is known before `start()`; should they
    be taken by then, it starts on others and tells the `on_url_change` listeners.
    """

    def __init__(
        self,
        settings: Settings,
        models: Sequence[str] | None = None,
        *,
        extra_args: Sequence[str] = (),
        restart_backoff_s: float = 0.5,
    ) -> None:
        self._settings = settings
        self._models = list(settings.triton_models if models is None else models)
        self._extra_args = list(extra_args)
        self._backoff_s = restart_backoff_s
        self._state_dir = Path(settings.state_dir).resolve()
        self._log_path = self._state_dir / "triton" / "tritonserver.log"
        self._ports = free_ports(3, _HOST)  # grpc, http, metrics
        self._served = False  # was ready once: a later move of its ports is a restart's
        self._proc: asyncio.subprocess.Process | None = None
        self._shm_prefix = ""
        self._instance = next(_instances)
        self._launches = 0
        self._restarts = 0
        self._started_at = 0.0
        self._listeners: list[UrlListener] = []
        self._ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._start_called = False
        self._install: TritonInstall | None = None
        self._backend_dir: Path | None = None

    # -- public API ------------------------------------------------------------------------------

    @property
    def grpc_url(self) -> str:
        """`127.0.0.1:PORT` of Triton's gRPC endpoint."""
        return f"{_HOST}:{self._ports[0]}"

    @property
    def http_port(self) -> int:
        return self._ports[1]

    @property
    def metrics_port(self) -> int:
        return self._ports[2]

    @property
    def pid(self) -> int | None:
        """The current tritonserver's process id (None when not running)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def restarts(self) -> int:
        """How many times the supervisor brought Triton back after an unexpected exit."""
        return self._restarts

    @property
    def log_path(self) -> Path:
        return self._log_path

    def is_ready(self) -> bool:
        """True while the current process is up and was seen ready (no network call)."""
        return self._ready.is_set()

    def on_url_change(self, listener: UrlListener) -> None:
        """Call `listener(new_grpc_url)` when a restart had to move Triton to other ports."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Start tritonserver and wait until it is live and every model is ready.

        Raises BackendUnavailable (with the tail of Triton's log) if it exits or is not ready
        within `triton_startup_timeout_s`.
        """
        if self._start_called or self._stopping:
            raise RuntimeError("EmbeddedTriton.start() called twice, or after stop()")
        self._start_called = True
        self._install = find_triton_install()
        self._backend_dir = prepare_backend_directory(self._install, self._state_dir)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_path.write_bytes(b"")  # one log per run of ours; restarts append to it
        began = time.monotonic()
        await self._launch_until_ready()
        log.info(
            "embedded Triton ready at %s in %.1fs (models: %s, log: %s)",
            self.grpc_url,
            time.monotonic() - began,
            ", ".join(self._models) or "none",
            self._log_path,
        )
        self._supervisor = asyncio.create_task(self._supervise(), name="triton-supervisor")

    async def wait_ready(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until Triton is ready (at once unless it is restarting).

        Raises BackendUnavailable if it is stopped or still not ready after `timeout` seconds.
        """
        if self._ready.is_set():
            return
        if self._stopping or not self._start_called:
            raise BackendUnavailable("embedded Triton is not running")
        waiters = {
            asyncio.ensure_future(self._ready.wait()),
            asyncio.ensure_future(self._stopped.wait()),
        }
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if not self._ready.is_set():
            raise BackendUnavailable("embedded Triton is not ready")

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 (SIGTERM grace)
        """SIGTERM, wait up to `timeout` s, then SIGKILL. Idempotent; concurrent calls share."""
        if self._stop_task is None:
            self._stopping = True
            self._ready.clear()
            self._stopped.set()
            self._stop_task = asyncio.create_task(self._stop(timeout), name="triton-stop")
        await asyncio.shield(self._stop_task)

    async def __aenter__(self) -> EmbeddedTriton:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- launching -------------------------------------------------------------------------------

    async def _launch_until_ready(self) -> None:
        """Launch until ready, choosing new ports when ours turn out to be taken."""
        previous_url = self.grpc_url
        for attempt in range(_PORT_TRIES):
            # Same ports when free, so clients reconnect without being told; checked first
            # because Triton only finds a clash after loading every model.
            if attempt > 0 or not ports_free(self._ports, _HOST):
                self._ports = free_ports(3, _HOST)
            try:
                await self._launch_once()
                break
            except _StartFailure as failure:
                if failure.port_clash and attempt + 1 < _PORT_TRIES:
                    log.warning("Triton ports %s were taken; retrying on other ports", self._ports)
                    continue
                raise BackendUnavailable(
                    f"embedded Triton failed to start: {failure.reason}\n"
                    f"--- last lines of {self._log_path} ---\n{failure.tail}"
                ) from None
        if previous_url != self.grpc_url:
            log.log(
                logging.WARNING if self._served else logging.INFO,
                "embedded Triton moved from %s to %s",
                previous_url,
                self.grpc_url,
            )
            for listener in list(self._listeners):
                try:
                    listener(self.grpc_url)
                except Exception:
                    log.exception("Triton URL listener failed")
        self._served = True
        self._ready.set()

    def _command(self) -> list[str]:
        assert self._install is not None and self._backend_dir is not None
        grpc_port, http_port, metrics_port = self._ports
        args = [
            str(self._install.binary),
            f"--model-repository={Path(self._settings.model_repository).resolve()}",
            f"--backend-directory={self._backend_dir}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self._models),
            f"--grpc-address={_HOST}",
            f"--grpc-port={grpc_port}",
            f"--http-address={_HOST}",
            f"--http-port={http_port}",
            f"--metrics-address={_HOST}",
            f"--metrics-port={metrics_port}",
            # Our own prefix for the Python backend's /dev/shm regions, so we can remove what a
            # killed server leaves behind without touching other servers' regions.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            "--log-verbose=0",
            "--exit-on-error=true",
        ]
        return args + self._extra_args

    def _environment(self) -> dict[str, str]:
        """Ours, plus Triton's libraries; our venv first on PATH so the stub finds numpy & co."""
        assert self._install is not None
        env = dict(os.environ)
        bin_dir = os.path.dirname(sys.executable)  # not resolved: a venv's bin is a symlink farm
        env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH", "")) if p)
        libs = str(self._install.libs)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libs, env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    async def _launch_once(self) -> None:
        """Start one tritonserver process and wait for it; on failure, leave nothing running."""
        if self._stopping:
            raise _StartFailure("stopped while starting", "")
        self._launches += 1
        self._shm_prefix = f"voicegate_{os.getpid()}_{self._instance}_{self._launches}_"
        command = self._command()
        with open(self._log_path, "ab") as log_file:  # noqa: ASYNC230 (local, microseconds)
            offset = log_file.tell()
            log_file.write(f"=== voicegate launch {self._launches}: {command}\n".encode())
            log_file.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *_launch_command(command),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=self._environment(),
                # Own session: a Ctrl-C in the terminal reaches us, and we decide when Triton
                # stops; it also lets us kill Triton's stub processes as one group.
                start_new_session=True,
            )
        self._started_at = time.monotonic()
        try:
            await self._wait_until_ready(self._proc, offset)
        except BaseException:
            await self._reap_leftovers(self._proc)  # a launch that failed gets no grace
            raise

    async def _wait_until_ready(self, proc: asyncio.subprocess.Process, offset: int) -> None:
        deadline = time.monotonic() + self._settings.triton_startup_timeout_s
        delay = 0.05
        client = TritonClient(self.grpc_url)  # the front server's own readiness probe
        exited = asyncio.ensure_future(proc.wait())
        try:
            while True:
                if self._stopping:  # stop() ran while we were starting: it may miss this one
                    raise _StartFailure("stopped while starting", "")
                if proc.returncode is not None:
                    tail = await asyncio.to_thread(self._log_tail, offset)
                    clash = any(word in tail.lower() for word in _BIND_ERRORS)
                    raise _StartFailure(
                        f"tritonserver exited with code {proc.returncode}", tail, clash
                    )
                if await client.is_ready(self._models):
                    # Triton answers ready once its gRPC endpoint is up, then starts its HTTP
                    # and metrics endpoints; when one fails (its port taken) it logs so at once
                    # but exits only a second later, answering ready meanwhile. Give it a
                    # moment, then look for that line.
                    await asyncio.wait({exited}, timeout=_SETTLE_S)
                    tail = await asyncio.to_thread(self._log_tail, offset)
                    if proc.returncode is None and not _ENDPOINT_FAILURE.search(tail):
                        return
                    if proc.returncode is None:
                        clash = any(word in tail.lower() for word in _BIND_ERRORS)
                        raise _StartFailure(
                            "tritonserver failed to start one of its endpoints", tail, clash
                        )
                if time.monotonic() >= deadline:
                    raise _StartFailure(
                        "not ready within "
                        f"{self._settings.triton_startup_timeout_s:g}s (triton_startup_timeout_s)",
                        await asyncio.to_thread(self._log_tail, offset),
                    )
                # Sleep, but wake at once if the process exits (a failed load ends quickly).
                await asyncio.wait({exited}, timeout=delay)
                delay = min(delay * 1.5, 0.5)
        finally:
            exited.cancel()
            await client.close()

    def _log_tail(self, offset: int) -> str:
        """The last informative lines this launch wrote (Triton's option table left out)."""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(max(offset, f.seek(0, os.SEEK_END) - 256 * 1024))
                text = f.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        lines = []
        in_options = False
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("+-") or not stripped:
                continue
            if stripped.startswith("| Option"):
                in_options = True
            if stripped.startswith("|"):
                if in_options:
                    continue
            else:
                in_options = False
            lines.append(line.rstrip())
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    # -- supervision and shutdown ----------------------------------------------------------------

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            self._ready.clear()
            uptime = time.monotonic() - self._started_at
            if uptime >= _HEALTHY_AFTER_S:
                failures = 0  # it ran well for a while: start the backoff over
            tail = await asyncio.to_thread(self._log_tail, 0)  # up to 256 KiB read
            log.warning(
                "tritonserver (pid %d) exited unexpectedly with code %s after %.1fs; "
                "last log lines:\n%s",
                proc.pid,
                code,
                uptime,
                tail,
            )
            await self._reap_leftovers(proc)
            while not self._stopping:
                delay = self._backoff(failures)
                failures += 1
                log.warning("restarting tritonserver in %.2fs (attempt %d)", delay, failures)
                await asyncio.sleep(delay)
                try:
                    began = time.monotonic()
                    await self._launch_until_ready()
                except BackendUnavailable as exc:
                    log.warning("tritonserver restart failed: %s", exc)
                    continue
                except Exception:  # e.g. fork failing: keep supervising, never die silently
                    log.exception("tritonserver restart failed")
                    continue
                self._restarts += 1
                log.warning(
                    "tritonserver restarted at %s (pid %s) in %.1fs",
                    self.grpc_url,
                    self.pid,
                    time.monotonic() - began,
                )
                break

    def _backoff(self, failures: int) -> float:
        """Exponential with equal jitter: spreads restarts of many replicas crashing at once."""
        ceiling = min(_RESTART_BACKOFF_MAX_S, self._backoff_s * (2.0**failures))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _stop(self, grace_s: float) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._proc is not None:
            await self._terminate(self._proc, grace_s)
            log.info("embedded Triton stopped")

    async def _terminate(self, proc: asyncio.subprocess.Process, grace_s: float) -> None:
        """SIGTERM (Triton unloads models and stops its stubs), then SIGKILL the whole group."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), grace_s)
            except TimeoutError:
                log.warning("tritonserver did not stop within %.1fs: killing it", grace_s)
        await self._reap_leftovers(proc)

    async def _reap_leftovers(self, proc: asyncio.subprocess.Process) -> None:
        """Kill what is left of the process group (stubs of a killed server), free its shm."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if self._shm_prefix:
            _remove_shm_regions(self._shm_prefix)


def _remove_shm_regions(prefix: str) -> None:
    """Unlink the Python backend's /dev/shm regions named `prefix*` (a killed server's)."""
    for region in _SHM_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            region.unlink()
