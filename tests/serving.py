"""`voicegate serve` as a real process for the tests: started, and waited for until it logs that
it is ready."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY_LINE = "voicegate ready"


def start_serve(
    log_path: Path,
    env: dict[str, str],
    args: Sequence[str] = (),
    program: Sequence[str] = (sys.executable, "-m", "server.cli"),
    timeout_s: float = 240.0,
) -> subprocess.Popen[bytes]:
    """`program serve *args` with `env` over this environment, stdout and stderr to `log_path`;
    returns once the log has the ready line. Fails the test (and kills the process) when the
    process exits first or `timeout_s` passes."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*program, "serve", *args],
            cwd=ROOT,
            env=dict(os.environ, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no ready line within {timeout_s:.0f} s"
            time.sleep(0.2)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    return process
