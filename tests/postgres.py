"""A throwaway PostgreSQL server for tests: initdb into a temporary folder, pg_ctl start on a
free port with its unix socket in that folder, stopped (and removed) at the end.

The binaries are looked up on PATH, then in /usr/lib/postgresql/*/bin (Debian's layout);
`.ci/run` installs the `postgresql` package when neither has them. PostgreSQL refuses to run
as root, so under root the server runs as the `postgres` user (or `nobody`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from server.triton_process import free_ports

DATABASE = "voicegate"
USER = "voicegate"


def find_bin_dir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres, or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for candidate in candidates:
        if all((candidate / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return candidate
    return None


def _run_as() -> pwd.struct_passwd | None:
    """Who runs the server: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists")


@dataclass(frozen=True)
class PostgresServer:
    url: str
    socket_dir: Path
    port: int


@contextlib.contextmanager
def postgres_server(bin_dir: Path) -> Iterator[PostgresServer]:
    """Start a fresh cluster; yields its URL (unix socket, trust authentication)."""
    user = _run_as()
    root = Path(tempfile.mkdtemp(prefix="voicegate-pg-"))
    data = root / "data"
    (port,) = free_ports(1)
    kwargs: dict[str, object] = {}
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = dict(os.environ, LC_ALL="C", LANG="C")
    log = root / "server.log"

    def run(*args: str) -> None:
        result = subprocess.run(
            args, cwd=root, env=env, capture_output=True, text=True, timeout=120, **kwargs
        )  # type: ignore[call-overload]
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}\n{result.stderr}")

    run(
        str(bin_dir / "initdb"),
        "-D",
        str(data),
        "-U",
        USER,
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
    )
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=on "
        "-c shared_buffers=32MB -c max_connections=40"
    )
    started = False
    try:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        started = True
        run(
            str(bin_dir / "createdb") if (bin_dir / "createdb").exists() else "createdb",
            "-h",
            str(root),
            "-p",
            str(port),
            "-U",
            USER,
            DATABASE,
        )
        url = f"postgresql://{USER}@/{DATABASE}?host={root}&port={port}"
        yield PostgresServer(url=url, socket_dir=root, port=port)
    finally:
        if started:
            with contextlib.suppress(Exception):
                run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
