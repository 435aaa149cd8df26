"""A real, throwaway PostgreSQL server for the audit-trail tests, and small helpers.

`postgres_server()` runs Debian's `initdb` and `pg_ctl` (package `postgresql`) into a fresh
temporary folder, listening only on a unix socket there; as root it runs them as the
`postgres` user (initdb refuses root). Each test then gets its own database.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from conftest import require

PG_ROOT = Path("/usr/lib/postgresql")


def _pg_bin() -> Path | None:
    found = sorted(PG_ROOT.glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a PostgreSQL cluster; yields the URL of its `postgres` database."""
    bin_dir = _pg_bin()
    require(
        bin_dir is not None and importable("psycopg"),
        "PostgreSQL (apt-get install postgresql; `make test` does it as root) and psycopg "
        "(pip install 'covid-cxr[postgres]') are needed for the PostgreSQL audit tests",
    )
    root = Path(tempfile.mkdtemp(prefix="covid-cxr-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def run(*command: str | Path) -> None:
        subprocess.run([*as_user, *map(str, command)], check=True, capture_output=True)

    try:
        run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync")
        options = f"-p {port} -k {root} -c listen_addresses=''"
        run(bin_dir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o", options, "start")
        try:
            yield f"postgresql://postgres@/postgres?host={root}&port={port}"
        finally:
            run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new empty database on the server, so that every test starts from an empty trail."""
    import psycopg

    name = f"audit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return server_url.replace("/postgres?", f"/{name}?", 1)


def stored_bytes(url: str) -> bytes:
    """Every byte the trail left on disk: the SQLite file and its WAL, or the whole data
    folder of the test's PostgreSQL cluster (tables and write-ahead log)."""
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        files = db.parent.glob(db.name + "*")
    else:
        host = parse_qs(urlsplit(url).query)["host"][0]
        files = (Path(host) / "data").rglob("*")
    return b"".join(f.read_bytes() for f in files if f.is_file())


def importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
