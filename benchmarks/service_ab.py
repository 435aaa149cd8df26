"""Server CPU per request: this tree against a git revision, interleaved, on the same machine.

Starts `covid-cxr serve` twice (the revision's source unpacked with `git archive` into a
temporary folder, and this tree's), warms both up, then sends rounds of sequential uploads of
the same 640-pixel JPEG over one keep-alive connection to each in turn (ABBA order), reading
each server's CPU time with psutil. Interleaving cancels the drift of a shared machine's
load, which the absolute figures of load_test.py cannot. Prints the median server CPU ms per
request of each, and their ratio.

    python benchmarks/service_ab.py [--before REV] [--rounds 6] [--requests 60]
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from load_test import find_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_launcher import RunningServer, start_server  # the tests' launcher, shared

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "ab-boundary"


def upload_request(host: str, data: bytes) -> bytes:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /api/v1/predict HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def measure(server: RunningServer, data: bytes, count: int) -> float:
    """Server CPU milliseconds per request over `count` sequential requests."""
    port = int(server.url.rsplit(":", 1)[1])
    request = upload_request(f"127.0.0.1:{port}", data)
    process = psutil.Process(server.process.pid)
    with socket.create_connection(("127.0.0.1", port)) as sock, sock.makefile("rb") as answers:
        before = process.cpu_times()
        for _ in range(count):
            sock.sendall(request)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += answers.readline()
            if not head.startswith(b"HTTP/1.1 200"):
                sys.exit(f"{server.url} answered {head[:40]!r}")
            answers.read(int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)))
        after = process.cpu_times()
    return (after.user + after.system - before.user - before.system) * 1000 / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="main", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=60, help="requests per round")
    args = parser.parse_args()
    image = find_jpeg()
    data = image.read_bytes()
    with tempfile.TemporaryDirectory(prefix="covid-cxr-ab-") as tmp:
        old = Path(tmp) / "before"
        old.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.before, "src"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees = {args.before: old, "this tree": ROOT}
        servers = {
            name: start_server(
                ["--log-level", "warning"],
                Path(tmp) / f"{index}.log",
                env={"PYTHONPATH": str(tree / "src")},
                cwd=tree,
            )
            for index, (name, tree) in enumerate(trees.items())
        }
        try:
            for server in servers.values():
                measure(server, data, 20)
            figures: dict[str, list[float]] = {name: [] for name in servers}
            for round_ in range(args.rounds):
                order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
                for name in order:
                    figures[name].append(measure(servers[name], data, args.requests))
        finally:
            for server in servers.values():
                server.stop()
    print(f"image {image.name}; {args.rounds} rounds x {args.requests} sequential requests each")
    # Other work on the machine only ever adds CPU time (caches, frequency): the least round
    # is the steadiest estimate, the median the typical one.
    for name, values in figures.items():
        spread = ", ".join(f"{value:.1f}" for value in sorted(values))
        print(f"{name:>12}: server CPU ms per request, rounds: {spread}")
    for label, pick in (("least", min), ("median", lambda v: sorted(v)[len(v) // 2])):
        ratio = pick(figures["this tree"]) / pick(figures[args.before])
        print(f"this tree / {args.before}, {label} round: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
