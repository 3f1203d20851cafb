"""Load figures for `meissonic serve`: requests per second with --max-batch 4 against 1, and the server's memory
between rounds.

For each --max-batch value a server starts in its own process; CLIENTS threads send REQUESTS text-to-image requests
(OpenAI API) in each of two rounds; the script prints the answers by status, requests per second and the server's
RSS after each round (flat between rounds: nothing accumulates).

    python scripts/bench_serve.py                       # the demo model, 8 clients, 40 requests a round
    python scripts/bench_serve.py --model PATH --steps 8 --size 256 --batches 1 2 4 8
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil

KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, max_batch: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "meissonic", "serve", "--model", model, "--port", str(port),
                                "--max-batch", str(max_batch), "--max-queue", str(max_queue)],
                               env={**os.environ, "MEISSONIC_API_KEY": KEY}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"the server for --max-batch {max_batch} stopped")
        time.sleep(0.5)
    raise SystemExit("the server did not get ready")


def one_round(url: str, clients: int, requests: int, steps: int, size: int) -> tuple[Counter, float]:
    def ask(i: int) -> int:
        body = {"prompt": f"a red circle {i}", "seed": i, "steps": steps, "size": f"{size}x{size}"}
        try:
            return httpx.post(f"{url}/v1/images/generations", json=body, timeout=600,
                              headers={"Authorization": f"Bearer {KEY}"}).status_code
        except httpx.HTTPError:
            return -1  # no answer at all: a failure

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        codes = Counter(pool.map(ask, range(requests)))
    return codes, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="the --max-batch values to compare")
    args = p.parse_args(argv)
    print(f"{args.model}: {args.clients} clients, {args.requests} requests a round, {args.steps} steps, "
          f"{args.size} px, --max-queue {args.max_queue}")
    rates = {}
    for max_batch in args.batches:
        process, url = serve(args.model, max_batch, args.max_queue)
        try:
            for round_ in (1, 2):
                codes, seconds = one_round(url, args.clients, args.requests, args.steps, args.size)
                rates[max_batch] = codes[200] / seconds
                rss_mib = psutil.Process(process.pid).memory_info().rss / 2**20
                print(f"--max-batch {max_batch} round {round_}: {dict(codes)} in {seconds:.1f} s, "
                      f"{rates[max_batch]:.2f} images/s, server RSS {rss_mib:.0f} MiB", flush=True)
        finally:
            process.terminate()
            process.wait(60)
    if len(rates) > 1:
        base = rates[args.batches[0]]
        print(" ".join(f"--max-batch {b}: {r / base:.2f}x" for b, r in rates.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
