"""Load test of `logitfusion serve`: throughput and latency at 1, 8 and 32 concurrent streams, ONE run.

    .venv/bin/python benchmarks/serve_load.py [--concurrency 1 8 32] [--tokens 64] [--rounds 3] [--server-threads N]

Builds the toy models of `logitfusion demo` (or reuses them in demo_out/models), writes a recipe
for them (large + small + the `arith` expert, dynamic fusion), starts `logitfusion serve` in a
subprocess on a free loopback port (the server gets its own process, as in production; the load
generator's threads do not share its interpreter), and drives it with the `openai` client:
for each concurrency C, C threads each send `--rounds` streamed completions back to back (more at low
concurrency, so that every level has at least `--min-requests`), every one
generating exactly `--tokens` tokens (ignore_eos). Reports, per C: generated tokens/s over the
wall time of that level, latency p50/p99 (request sent -> last chunk) and time-to-first-token p50.
Prints a markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import yaml
from rich.console import Console

from logitfusion import toy
from logitfusion.demo import build_demo_models


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    return (f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


def start_server(recipe: Path, port: int, max_batch: int, threads: int | None, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("logitfusion")
    out = open(log, "w")
    cmd = [str(exe), "serve", "--recipe", f"demo={recipe}", "--port", str(port), "--max-batch", str(max_batch),
           "--max-tokens-limit", "1024", "--log-level", "warning"] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()}")
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up in 120 s")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.25)


def one_request(client: openai.OpenAI, prompt: str, tokens: int, solver: str) -> dict:
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    stream = client.completions.create(model="demo", prompt=prompt, max_tokens=tokens, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True, "fusion": {"solver": solver}})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.choices:
            text.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": first if first is not None else latency,
            "tokens": usage.completion_tokens if usage else 0}


def level(client: openai.OpenAI, prompts: list[str], concurrency: int, rounds: int, tokens: int,
          solver: str) -> dict:
    results, errors, lock = [], [], threading.Lock()

    def worker(i: int) -> None:
        for r in range(rounds):
            try:
                res = one_request(client, prompts[(i * rounds + r) % len(prompts)], tokens, solver)
                with lock:
                    results.append(res)
            except Exception as e:  # reported, not hidden
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed at concurrency {concurrency}: {errors[:3]}")
    lat = [r["latency"] for r in results]
    return {"concurrency": concurrency, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "wall": wall, "tok_s": sum(r["tokens"] for r in results) / wall,
            "p50": percentile(lat, 50), "p99": percentile(lat, 99),
            "ttft50": percentile([r["ttft"] for r in results], 50)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request (EOS ignored)")
    ap.add_argument("--rounds", type=int, default=3, help="requests each client sends, back to back")
    ap.add_argument("--min-requests", type=int, default=24,
                    help="at low concurrency clients send more rounds, so that every level has this many requests")
    ap.add_argument("--solver", default="dynamic", help="fusion solver spec sent with every request")
    ap.add_argument("--models", type=Path, default=Path("demo_out/models"))
    ap.add_argument("--server-threads", type=int, default=None,
                    help="passed to `logitfusion serve --threads` (default: torch's choice)")
    args = ap.parse_args()
    console = Console(stderr=True)
    paths = build_demo_models(args.models, console)
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    recipe = work / "demo.yaml"
    recipe.write_text(yaml.safe_dump({
        "large": {"path": str(paths["large"].resolve())}, "small": {"path": str(paths["small"].resolve())},
        "experts": [{"name": "arith", "path": str(paths["expert"].resolve())}], "solver": {"kind": "dynamic"}}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    max_batch = max(args.concurrency)
    proc = start_server(recipe, port, max_batch, args.server_threads, work / "server.log")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                               timeout=600)
        prompts = [q for q, _ in toy.arithmetic_facts()[1]]
        level(client, prompts, 2, 1, 8, args.solver)  # warm-up
        rows = [level(client, prompts, c, max(args.rounds, -(-args.min_requests // c)), args.tokens, args.solver)
                for c in args.concurrency]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    base = rows[0]["tok_s"]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"\nmachine: {machine()}; load average at the end (1/5/15 min): {load}")
    print(f"models: demo toy models (large 4x128, small 2x48, 1 expert), solver {args.solver}, "
          f"{args.tokens} tokens per request (EOS ignored), streamed, each client sending its requests back to back, "
          f"server --max-batch {max_batch}"
          + (f" --threads {args.server_threads}" if args.server_threads else "") + "\n")
    print("| concurrent streams | requests | tokens/s | vs 1 stream | latency p50 (s) | latency p99 (s) "
          "| first token p50 (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['tok_s']:.0f} | {r['tok_s'] / base:.1f}x | "
              f"{r['p50']:.2f} | {r['p99']:.2f} | {r['ttft50']:.3f} |")


if __name__ == "__main__":
    main()
