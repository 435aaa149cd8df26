"""Load test of `covid-cxr serve` on loopback: requests/s and latency at several concurrencies.

Starts the real server (uvicorn in a subprocess on 127.0.0.1, a free port), uploads the same
640-pixel JPEG radiograph over and over with an async httpx client (one keep-alive
connection per concurrent client), and prints per concurrency level: requests, errors,
requests/s, p50/p90/p99/max latency, plus the server's peak resident memory (sampled with
psutil every 20 ms). Each level is bounded in requests and seconds.

The clients are well-behaved by default: they send `Prefer: wait=10` (hold me for a place
rather than refuse me) and, when refused anyway, sleep the Retry-After the server computed
before trying again. `--impatient` drops both: every refusal is retried at once, the worst
case for a server shedding load. A 503 counts as an error either way.

Baseline in the same run: the same Predictor called in a loop in this process, no HTTP, one
thread: the service's throughput is shown as a ratio of it.

The client runs on the same machine and shares its CPU cores with the server, so the figures
understate what the server alone could do; the script prints the core count and load average.
Goals, on a 2-core machine: >= 60 requests/s with p99 < 150 ms at concurrency 16 for
640-pixel JPEGs, server memory < 1 GiB (issue 6); at concurrency 64, at least 60% of the
throughput at 16 (issue 13).

    python benchmarks/load_test.py [--model PATH] [--levels 1,16,64,128] [--requests 2000]
        [--seconds 15] [--cam] [--int8] [--client raw|httpx] [--impatient]
        [-- extra `covid-cxr serve` options]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil

from covid_cxr.paths import DEFAULT_MODEL, data_root

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_launcher import start_server  # the tests' launcher, shared

GOAL_RPS, GOAL_P99_MS, GOAL_LEVEL, GOAL_RSS = 60.0, 150.0, 16, 1024**3
OVERLOAD_SHARE = 0.6


def find_jpeg() -> Path:
    """A 640-pixel JPEG from the COVID-19 image data collection (the first by name)."""
    from PIL import Image

    folder = data_root() / "covid-chestxray-dataset" / "images"
    if not folder.is_dir():
        sys.exit(f"{folder} not found: set COVID_CXR_DATA to the shared datasets folder")
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as image:
            if max(image.size) == 640 and image.mode == "L":
                return path
    sys.exit(f"no 640-pixel grayscale JPEG in {folder}")


def pick_model(requested: str | None, int8: bool, workdir: Path) -> tuple[Path, str]:
    """The model to serve and how to describe it in the output.

    Without the shipped model, an untrained efficientnet-lite0 exported the way
    `covid-cxr export` does (optionally int8, calibrated on 32 real radiographs) stands in:
    the same graph runs at the same speed whatever its weights.
    """
    if requested:
        return Path(requested), f"{requested} (given)"
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL, f"{DEFAULT_MODEL.name} (the shipped model)"
    import torch

    from covid_cxr.imaging import PreprocessConfig, preprocess, read_radiograph
    from covid_cxr.inference.onnx_export import export_onnx
    from covid_cxr.inference.quantize import quantize_int8
    from covid_cxr.models import create
    from covid_cxr.models.checkpoint import ModelInfo

    torch.manual_seed(0)
    config = PreprocessConfig(size=224)
    info = ModelInfo("efficientnet-lite0", preprocess=config, version="bench-untrained")
    path = workdir / "lite0-untrained.onnx"
    export_onnx(create("efficientnet-lite0", pretrained=False).eval(), info, path)
    precision = "fp32"
    if int8:
        images = sorted((data_root() / "covid-chestxray-dataset" / "images").glob("*.jpg"))[:32]
        calibration = np.stack([preprocess(read_radiograph(p).pixels, config) for p in images])
        # Min-max: the percentile histogram fails on an untrained network's narrow activations.
        path = quantize_int8(
            path, workdir / "lite0-untrained-int8.onnx", calibration[:, None], method="minmax"
        )
        precision = "int8"
    return path, (
        f"untrained efficientnet-lite0, ONNX {precision} export at 224 px, standing in for "
        f"the shipped model {DEFAULT_MODEL.name}, which does not exist yet"
    )


class ServerMeter:
    """The server's peak resident memory (sampled in a background thread) and CPU time,
    its child processes included (uvicorn --workers N runs the app in children)."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in [self.process, *self.process.children(recursive=True)]:
            times = process.cpu_times()
            total += times.user + times.system
        return total

    def __enter__(self) -> ServerMeter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


BOUNDARY = "covid-cxr-load-test"
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
RETRY_AFTER = re.compile(rb"(?i)\r\nretry-after: *(\d+)")
PREFER_WAIT_S = 10


def predict_request(host: str, data: bytes, cam: bool, wait: int) -> bytes:
    """The whole HTTP/1.1 request for one upload, built once."""
    body = (
        (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="radiograph.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /api/v1/predict{'?cam=true' if cam else ''} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        + (f"Prefer: wait={wait}\r\n" if wait else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class RawClient:
    """One keep-alive connection that sends a pre-built request and reads the response.

    The load generator shares the server's cores, so its own cost is taken from the server:
    this one spends a fraction of httpx's CPU per request (both are measured and printed).
    """

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host, self.port, self.request = host, port, request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.retry_after = 0.0

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self) -> int:
        for attempt in range(2):
            if self.writer is None:
                await self.open()
            try:
                self.writer.write(self.request)
                head = await self.reader.readuntil(b"\r\n\r\n")
                length = CONTENT_LENGTH.search(head)
                body = await self.reader.readexactly(int(length.group(1)) if length else 0)
                status = int(head[9:12])
                retry = RETRY_AFTER.search(head)
                self.retry_after = float(retry.group(1)) if retry else 0.0
                if status == 200 and b'"probability"' not in body:
                    return 0
                return status
            except (ConnectionError, asyncio.IncompleteReadError):
                # The server may close an idle keep-alive connection: reconnect once.
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


class HttpxClient:
    """The same request through httpx, the client most Python users would write."""

    def __init__(self, client: httpx.AsyncClient, data: bytes, cam: bool, wait: int) -> None:
        self.client, self.data, self.params = client, data, {"cam": "true"} if cam else {}
        self.headers = {"Prefer": f"wait={wait}"} if wait else {}
        self.retry_after = 0.0

    async def open(self) -> None:
        await self.client.get("/healthz")

    async def post(self) -> int:
        response = await self.client.post(
            "/api/v1/predict",
            params=self.params,
            headers=self.headers,
            files={"file": ("radiograph.jpg", self.data, "image/jpeg")},
        )
        self.retry_after = float(response.headers.get("retry-after", 0))
        return response.status_code if "probability" in response.text else 0

    async def close(self) -> None:
        pass


async def run_level(
    url: str,
    data: bytes,
    concurrency: int,
    requests: int,
    seconds: float,
    cam: bool,
    kind: str,
    polite: bool = True,
) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    parts = urlsplit(url)
    wait = PREFER_WAIT_S if polite else 0
    request = predict_request(parts.netloc, data, cam, wait)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    shared = httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0)
    clients = [
        RawClient(parts.hostname, parts.port, request)
        if kind == "raw"
        else HttpxClient(shared, data, cam, wait)
        for _ in range(concurrency)
    ]

    async def worker(client: RawClient | HttpxClient) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            start = time.perf_counter()
            try:
                status = await client.post()
            except (OSError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            if status != 200:
                key = f"HTTP {status}" if status else "bad body"
                errors[key] = errors.get(key, 0) + 1
                if polite and client.retry_after:
                    await asyncio.sleep(min(client.retry_after, deadline - time.perf_counter()))
                continue
            latencies.append((time.perf_counter() - start) * 1000.0)

    async with shared:
        # Open every connection first, so the level measures requests, not TCP set-up.
        await asyncio.gather(*(client.open() for client in clients))
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(worker(client) for client in clients))
        elapsed = time.perf_counter() - start
        await asyncio.gather(*(client.close() for client in clients))
    ms = np.array(latencies) if latencies else np.array([float("nan")])
    return {
        "concurrency": concurrency,
        "ok": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
    }


def baseline(model: Path, data: bytes, count: int, threads: int) -> float:
    """Predictions/s of the same Predictor in this process, no HTTP, one caller."""
    from covid_cxr.inference.predictor import Predictor

    predictor = Predictor(model, threads=threads)
    for _ in range(5):
        predictor.predict(data)
    start = time.perf_counter()
    for _ in range(count):
        predictor.predict(data)
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model to serve (default: the shipped model)")
    parser.add_argument("--image", help="JPEG to upload (default: a 640 px one from the data)")
    parser.add_argument("--levels", default="1,16,64,128", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=2000, help="most requests per level")
    parser.add_argument("--seconds", type=float, default=15.0, help="most seconds per level")
    parser.add_argument("--warmup", type=int, default=30, help="requests before measuring")
    parser.add_argument("--cam", action="store_true", help="ask for the Grad-CAM overlay too")
    parser.add_argument(
        "--client", choices=["raw", "httpx"], default="raw", help="load generator (default raw)"
    )
    parser.add_argument(
        "--int8", action="store_true", help="without the shipped model: quantise the stand-in"
    )
    parser.add_argument(
        "--impatient",
        action="store_true",
        help="clients neither send Prefer: wait nor honour Retry-After",
    )
    parser.add_argument("serve_args", nargs="*", help="extra `covid-cxr serve` options")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]

    image = Path(args.image) if args.image else find_jpeg()
    data = image.read_bytes()
    with tempfile.TemporaryDirectory(prefix="covid-cxr-load-") as tmp:
        workdir = Path(tmp)
        model, described = pick_model(args.model, args.int8, workdir)
        serve_args = ["--model", str(model), "--log-level", "warning", *args.serve_args]
        print(f"model:   {described}")
        print(f"image:   {image.name}, {len(data) / 1024:.0f} KiB JPEG")
        print(f"server:  covid-cxr serve {' '.join(serve_args[2:])} (other settings default)")
        print(
            f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; the "
            f"client ({args.client}, one process) runs on the same cores as the server"
        )
        print(
            "clients: impatient (no Prefer: wait, a refusal is retried at once)"
            if args.impatient
            else f"clients: polite (Prefer: wait={PREFER_WAIT_S}, sleep Retry-After on 503)"
        )
        server = start_server(serve_args, workdir / "server.log")
        results = []
        try:
            with ServerMeter(server.process.pid) as meter:
                warm = asyncio.run(
                    run_level(server.url, data, 4, args.warmup, 60.0, args.cam, args.client)
                )
                if warm["errors"]:
                    print(f"warm-up errors: {warm['errors']}\n{server.log_text()[-2000:]}")
                    return 1
                for level in levels:
                    server_cpu, client_cpu = meter.cpu_seconds(), time.process_time()
                    row = asyncio.run(
                        run_level(server.url, data, level, args.requests, args.seconds,
                                  args.cam, args.client, not args.impatient)
                    )  # fmt: skip
                    done = max(row["ok"], 1)
                    row["server_ms"] = (meter.cpu_seconds() - server_cpu) * 1000 / done
                    row["client_ms"] = (time.process_time() - client_cpu) * 1000 / done
                    results.append(row)
                    print(
                        f"  c={level:>3}: {row['ok']:>4} ok, {row['rps']:6.1f} req/s, "
                        f"p50 {row['p50']:6.1f} ms, p99 {row['p99']:6.1f} ms",
                        flush=True,
                    )
        finally:
            server.stop()
        direct = baseline(model, data, 100, threads=1)

    report(results, direct, meter.peak)
    return 0


def report(results: list[dict], direct: float, peak_rss: int) -> None:
    """The table, the CPU bounds and the goals."""
    header = (
        "concurrency  requests  errors    req/s  p50 ms  p90 ms  p99 ms  max ms  vs direct"
        "  server CPU ms/req  client CPU ms/req"
    )
    print(f"\n{header}\n{'-' * len(header)}")
    for row in results:
        errors = sum(row["errors"].values())
        print(
            f"{row['concurrency']:>11}  {row['ok'] + errors:>8}  {errors:>6}  {row['rps']:>7.1f}"
            f"  {row['p50']:>6.1f}  {row['p90']:>6.1f}  {row['p99']:>6.1f}  {row['max']:>6.1f}"
            f"  {row['rps'] / direct:>8.2f}x  {row['server_ms']:>17.1f}  {row['client_ms']:>17.1f}"
        )
        if row["errors"]:
            print(f"{'':>13}errors: {row['errors']}")
    print(
        f"\nbaseline: Predictor.predict(bytes) in-process, 1 thread, no HTTP: {direct:.1f} "
        f"predictions/s ({1000 / direct:.1f} ms each)"
    )
    print(f"server peak resident memory: {peak_rss / 2**20:.0f} MiB")
    cores = os.cpu_count() or 1
    for row in results:
        # CPU time per request does not depend on what else runs on the machine: it bounds
        # what these cores could serve with nothing else running.
        cpu_ms = row["server_ms"] + row["client_ms"]
        print(
            f"c={row['concurrency']}: server + client use {cpu_ms:.1f} CPU ms per request: at "
            f"most {cores * 1000 / cpu_ms:.0f} req/s on {cores} idle cores "
            f"(server alone: {cores * 1000 / row['server_ms']:.0f} req/s)"
        )
    goal = next((row for row in results if row["concurrency"] == GOAL_LEVEL), None)
    if goal is None:
        return
    met = goal["rps"] >= GOAL_RPS and goal["p99"] < GOAL_P99_MS and not goal["errors"]
    met = met and peak_rss < GOAL_RSS
    print(
        f"goal at c={GOAL_LEVEL}: >= {GOAL_RPS:.0f} req/s, p99 < {GOAL_P99_MS:.0f} ms, "
        f"0 errors, < 1 GiB: {'MET' if met else 'NOT MET'} ({goal['rps']:.1f} req/s, "
        f"p99 {goal['p99']:.1f} ms, {peak_rss / 2**20:.0f} MiB). With {GOAL_LEVEL} "
        f"clients always waiting, mean latency = {GOAL_LEVEL} / throughput, so p99 < "
        f"{GOAL_P99_MS:.0f} ms needs more than {GOAL_LEVEL * 1000 / GOAL_P99_MS:.0f} req/s"
    )
    for row in results:
        if row["concurrency"] > GOAL_LEVEL:
            share = row["rps"] / goal["rps"]
            print(
                f"overload at c={row['concurrency']}: {share:.0%} of the c={GOAL_LEVEL} "
                f"throughput (goal >= {OVERLOAD_SHARE:.0%}): "
                f"{'MET' if share >= OVERLOAD_SHARE else 'NOT MET'}"
            )


if __name__ == "__main__":
    sys.exit(main())
