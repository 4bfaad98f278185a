"""Bounded load test of `ptanet serve` on loopback: starts the server, sends a fixed number of requests
at a fixed concurrency, stops the server, and prints what it measured.

    python scripts/load_test.py MODEL IMAGE [--requests 2000] [--concurrency 8] [--detect haar]

Printed: requests/s, latency p50/p99, errors (any answer but 200), the server's resident memory
before and after, and the model-only throughput (the same checks in this process, no HTTP) with the
ratio of the two. The model-only figure is measured before the server starts and after it stops and
averaged, because a shared machine's speed drifts. Everything stays on 127.0.0.1; the script ends by
itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"load_test: error: the server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("load_test: error: the server did not become ready")


def run_load(port: int, body: bytes, requests: int, concurrency: int) -> tuple[list[float], int, float]:
    """(latencies in ms of the 200 answers, error count, wall seconds); one kept-alive connection per worker."""
    local = threading.local()
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def one(_):
        nonlocal errors
        conn = getattr(local, "conn", None) or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        local.conn = conn
        start = time.perf_counter()
        try:
            conn.request("POST", "/v1/liveness", body=body, headers={"Content-Type": "application/octet-stream"})
            r = conn.getresponse()
            r.read()
            ok = r.status == 200
        except (OSError, http.client.HTTPException):
            ok, local.conn = False, None
        ms = (time.perf_counter() - start) * 1000.0
        with lock:
            if ok:
                latencies.append(ms)
            else:
                errors += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    return latencies, errors, time.perf_counter() - start


def model_only(model: str, body: bytes, detect: str | None, n: int) -> float:
    """Checks/s of LivenessChecker.check on the same bytes in this process (decode, detect, model)."""
    from ptanet.liveness import LivenessChecker

    checker = LivenessChecker(model, detect=detect)
    for _ in range(10):
        checker.check(body)
    start = time.perf_counter()
    for _ in range(n):
        checker.check(body)
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("image")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--detect", default="haar")
    parser.add_argument("--workers", type=int, default=2, help="server threads (ptanet serve --workers)")
    parser.add_argument("--model-runs", type=int, default=300, help="checks for the model-only throughput")
    args = parser.parse_args()
    body = Path(args.image).read_bytes()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "ptanet", "serve", args.model, "--port", str(port), "--detect", args.detect,
           "--workers", str(args.workers), "--queue", str(max(16, 2 * args.concurrency))]
    alone_before = model_only(args.model, body, args.detect, args.model_runs)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
        run_load(port, body, 50, args.concurrency)  # warm-up: allocator pools, threads, caches
        before = rss_mib(proc.pid)
        latencies, errors, seconds = run_load(port, body, args.requests, args.concurrency)
        after = rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    alone_after = model_only(args.model, body, args.detect, args.model_runs)
    alone = (alone_before + alone_after) / 2
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    result = {
        "requests": args.requests, "concurrency": args.concurrency, "errors": errors,
        "requests_per_s": len(latencies) / seconds, "p50_ms": q[49], "p99_ms": q[98],
        "rss_before_mib": before, "rss_after_mib": after, "rss_growth": after / before - 1.0,
        "model_only_per_s": alone, "model_only_before_after": [alone_before, alone_after], "service_vs_model_only": (len(latencies) / seconds) / alone,
    }
    print(json.dumps(result, indent=2))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
