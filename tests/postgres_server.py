"""A real PostgreSQL server for the sweep tests: initdb in a temporary folder, started on a free
loopback port (as the `postgres` user when the tests run as root: the server refuses root),
a password-protected role `vit`, stopped and removed afterwards. `.ci/run` installs Debian's
`postgresql` package where it is missing; without the binaries the tests that need a server
are skipped."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

ROLE, PASSWORD = "vit", "s3cret-Pw"  # a literal password: the tests check it is never written


def postgres_binary(name: str) -> str | None:
    """`initdb` / `pg_ctl` on the PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *command]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(command)]


@dataclass
class PostgresServer:
    folder: Path
    port: int

    def url(self, database: str, password: str = PASSWORD, host: str = "127.0.0.1") -> str:
        return f"postgresql+psycopg://{ROLE}:{password}@{host}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database owned by the role, for one test."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        dsn = f"host=127.0.0.1 port={self.port} user={ROLE} password={PASSWORD} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return name

    def stop(self) -> None:
        pg_ctl = postgres_binary("pg_ctl")
        data = self.folder / "data"
        subprocess.run(
            _as_server_user([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """Start a server (RuntimeError with its log when it does not start)."""
    initdb, pg_ctl = postgres_binary("initdb"), postgres_binary("pg_ctl")
    if not initdb or not pg_ctl:
        raise FileNotFoundError("PostgreSQL's initdb/pg_ctl are not installed")
    # under /tmp itself: the server user must be able to reach it (pytest's folders are 0700)
    folder = Path(tempfile.mkdtemp(prefix="vitlab-pg-"))
    folder.chmod(0o755)
    data, password_file = folder / "data", folder / "password"
    password_file.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(password_file, "postgres")
    port = _free_port()
    steps = [
        [initdb, "-D", str(data), "-U", ROLE, "-A", "scram-sha-256", f"--pwfile={password_file}"],
        [
            pg_ctl, "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=60",
            "start",
        ],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run(_as_server_user(step), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"{step[0]} failed: {done.stdout}{done.stderr}{log}"[-3000:])
    return PostgresServer(folder, port)
