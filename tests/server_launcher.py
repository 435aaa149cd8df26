"""Start `covid-cxr serve` in a subprocess on a free loopback port and wait until it is ready.

For the tests that need a real server rather than an app object (limits, streaming, the
browser), and for benchmarks/load_test.py, which puts this folder on sys.path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    serve_args: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    python_args: Sequence[str] = ("-m", "covid_cxr.cli"),
    timeout: float = 120.0,
    python: Sequence[str] = (sys.executable,),
) -> RunningServer:
    """Run `python <python_args> serve --host 127.0.0.1 --port <free> <serve_args>`.

    `python`: the interpreter, or a command wrapping it (another venv's, strace -f python).

    The child gets this environment minus COVID_CXR_* settings (so a developer's shell does
    not change what is measured or tested), plus `env`. Its output goes to `log_path`.
    Returns once /readyz answers 200; raises RuntimeError with the log if it never does.
    """
    port = free_port()
    keep = {"COVID_CXR_DATA"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COVID_CXR_") or k in keep}
    command = [*python, *python_args, "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, *serve_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**clean, **(env or {})},
        )
    scheme = "https" if "--ssl-certfile" in serve_args else "http"
    server = RunningServer(f"{scheme}://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()}")
        try:
            # Readiness only: whether the certificate checks out is the caller's test.
            ready = httpx.get(f"{server.url}/readyz", timeout=2.0, verify=False)
            if ready.status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{server.log_text()}")
