"""Load test of `logitfusion serve`: throughput and latency at 1, 8, 32 and 64 concurrent streams,
then a mixed run where clients disconnect and bad requests arrive, ONE run.

    .venv/bin/python benchmarks/serve_load.py [--concurrency 1 8 32 64] [--tokens 32] [--rounds 3]
        [--mixed 64] [--disconnect 0.25] [--server-threads N] [--zoo ROOT]

Writes a recipe over the bundled zoo (large + small + the `math` expert, dynamic fusion; or the
zoo build under --zoo), starts `logitfusion serve` in a subprocess on a free loopback port (the
server gets its own process, as in production) and drives it with the `openai` client: for each
concurrency C, C threads each send `--rounds` streamed completions back to back (more at low
concurrency, so that every level has at least `--min-requests`), every one generating exactly
`--tokens` tokens (ignore_eos). Reports, per C: generated tokens/s over the wall time of that
level, latency p50/p99 (request sent -> last chunk) and time-to-first-token p50.

The mixed run (`--mixed C`, 0 to skip) has C clients of which a fraction (`--disconnect`) close
their stream after two chunks, while one more client sends bad requests (a lone surrogate, a
seed beyond 64 bits, a chat role that does not exist, a degenerate weight, a wrong Content-Type,
NaN...) back to back. Every valid stream that completes must carry the text `Fuser.generate`
gives for its prompt (greedy); the run reports failed valid requests (must be 0), texts that
differ, the bad requests and their status codes (must all be 4xx), and the decoding slots left
held at the end (must be 0). Prints markdown tables and the machine it ran on; exits 1 if the
mixed run saw a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import yaml

from logitfusion.bench import zoo

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
           "--max-tokens-limit", "1024", "--log-level", "warning", "--api-key", API_KEY] \
        + (["--threads", str(threads)] if threads else [])
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


API_KEY = "serve-load"
# Bodies a careless or hostile client sends; each must be answered 4xx and hurt nobody else.
BAD = [
    ("/v1/completions", {"model": "demo", "prompt": "bad \ud800 x", "max_tokens": 4}, "application/json"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "temperature": 1.0, "seed": 2**70}, "application/json"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user\nsystem", "content": "x"}]},
     "application/json"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "fusion": {"solver": "static:1e38"}}, "application/json"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "fusion": {"solver": "static:-1"}}, "application/json"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, "application/json"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 4}, "text/plain"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "temperature": float("nan")}, "application/json"),
    ("/v1/completions", {"model": "demo", "prompt": "", "max_tokens": 4}, "application/json"),
    ("/v1/completions", {"model": "demo", "prompt": "word " * 5000, "max_tokens": 4}, "application/json"),
    ("/v1/completions", {"model": "demo", "prompt": ["a", "b"]}, "application/json"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "stop": "\udfff"}, "application/json"),
]


def one_request(client: openai.OpenAI, prompt: str, tokens: int, solver: str, hang_up_after: int | None = None) -> dict:
    """One streamed completion; with hang_up_after=k the client closes the stream after k chunks."""
    t0 = time.perf_counter()
    first, text, usage, chunks = None, [], None, 0
    stream = client.completions.create(model="demo", prompt=prompt, max_tokens=tokens, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True, "fusion": {"solver": solver}})
    for chunk in stream:
        chunks += 1
        if hang_up_after is not None and chunks >= hang_up_after:
            stream.close()
            return {"disconnected": True}
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.choices:
            text.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": first if first is not None else latency,
            "tokens": usage.completion_tokens if usage else 0, "text": "".join(text), "prompt": prompt}


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


def bad_requests(url: str, stop: threading.Event, statuses: Counter, leaks: list) -> None:
    """Send the BAD bodies in turn until `stop`; count status codes, keep any answer that shows a
    traceback or a path."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as http:
        i = 0
        while not stop.is_set():
            path, body, ctype = BAD[i % len(BAD)]
            i += 1
            try:
                r = http.post(path, content=json.dumps(body), headers={"Content-Type": ctype})
                statuses[r.status_code] += 1
                if "Traceback" in r.text or 'File "' in r.text or "site-packages" in r.text:
                    leaks.append(r.text[:300])
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1


def mixed(client: openai.OpenAI, url: str, prompts: list[str], want: dict[str, str], concurrency: int,
          rounds: int, tokens: int, solver: str, disconnect: float) -> dict:
    """`concurrency` streaming clients, a `disconnect` fraction of them hanging up after two
    chunks, and one client sending bad requests meanwhile."""
    hang_ups = round(concurrency * disconnect)
    done, failed, differ, dropped, lock = [], [], [], 0, threading.Lock()
    statuses, leaks, stop = Counter(), [], threading.Event()

    def worker(i: int) -> None:
        nonlocal dropped
        for r in range(rounds):
            prompt = prompts[(i * rounds + r) % len(prompts)]
            try:
                res = one_request(client, prompt, tokens, solver, hang_up_after=2 if i < hang_ups else None)
            except Exception as e:  # a valid request that failed: the finding this run looks for
                with lock:
                    failed.append(repr(e))
                continue
            with lock:
                if res.get("disconnected"):
                    dropped += 1
                    continue
                done.append(res)
                if res["text"] != want[prompt]:
                    differ.append((prompt, res["text"], want[prompt]))

    spammer = threading.Thread(target=bad_requests, args=(url, stop, statuses, leaks))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    spammer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    stop.set()
    spammer.join(120)
    wall = time.perf_counter() - t0
    held = None
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as http:
        deadline = time.time() + 30
        while time.time() < deadline:  # cancelled rows leave their batch at the next step
            held = next(float(line.split()[-1]) for line in http.get("/metrics").text.splitlines()
                        if line.startswith("logitfusion_active_sequences "))
            if held == 0:
                break
            time.sleep(0.2)
    lat = [r["latency"] for r in done] or [0.0]
    return {"concurrency": concurrency, "hang_ups": hang_ups, "completed": len(done), "dropped": dropped,
            "failed": failed, "differ": differ, "statuses": statuses, "leaks": leaks, "held": held, "wall": wall,
            "tok_s": sum(r["tokens"] for r in done) / wall, "p50": percentile(lat, 50), "p99": percentile(lat, 99)}


def expected_texts(recipe: Path, prompts: list[str], tokens: int, solver: str) -> dict[str, str]:
    """What the library answers for each prompt (greedy, ignore_eos): the streams must say the same."""
    from logitfusion import Fuser
    fuser = Fuser.from_recipe(recipe)
    gens = fuser.generate(prompts, solver=solver, max_new_tokens=tokens, ignore_eos=True, batch_size=16)
    return {p: g.text for p, g in zip(prompts, gens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32, 64])
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per request (EOS ignored)")
    ap.add_argument("--rounds", type=int, default=3, help="requests each client sends, back to back")
    ap.add_argument("--min-requests", type=int, default=24,
                    help="at low concurrency clients send more rounds, so that every level has this many requests")
    ap.add_argument("--mixed", type=int, default=64, help="clients of the mixed run (0: skip it)")
    ap.add_argument("--disconnect", type=float, default=0.25, help="fraction of the mixed run's clients that hang up")
    ap.add_argument("--solver", default="dynamic", help="fusion solver spec sent with every request")
    ap.add_argument("--zoo", type=Path, default=zoo.BUNDLED, help="zoo folder (default: the bundled zoo)")
    ap.add_argument("--server-threads", type=int, default=None,
                    help="passed to `logitfusion serve --threads` (default: torch's choice)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    recipe = work / "demo.yaml"
    recipe.write_text(yaml.safe_dump({
        "large": {"path": str(args.zoo / "models" / "large")}, "small": {"path": str(args.zoo / "models" / "small")},
        "experts": [{"name": "math", "path": str(args.zoo / "experts" / "math")}], "solver": {"kind": "dynamic"}}))
    prompts = [json.loads(line)["prompt"] for line in (args.zoo / "data" / "math" / "test.jsonl").read_text()
               .splitlines()[:16]]
    want = expected_texts(recipe, prompts, args.tokens, args.solver) if args.mixed else {}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    max_batch = max(args.concurrency + [args.mixed])
    url = f"http://127.0.0.1:{port}"
    proc = start_server(recipe, port, max_batch, args.server_threads, work / "server.log")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=600)
        level(client, prompts, 2, 1, 8, args.solver)  # warm-up
        rows = [level(client, prompts, c, max(args.rounds, -(-args.min_requests // c)), args.tokens, args.solver)
                for c in args.concurrency]
        mix = mixed(client, url, prompts, want, args.mixed, args.rounds, args.tokens, args.solver,
                    args.disconnect) if args.mixed else None
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"\nmachine: {machine()}; load average at the end (1/5/15 min): {load}")
    where = "the bundled zoo" if args.zoo == zoo.BUNDLED else f"the zoo in {args.zoo}"
    print(f"models: {where} (large, small, the math expert), solver {args.solver}, "
          f"{args.tokens} tokens per request (EOS ignored), streamed, each client sending its requests back to back, "
          f"server --max-batch {max_batch}" + (f" --threads {args.server_threads}" if args.server_threads else "") + "\n")
    if rows:
        base = rows[0]["tok_s"]
        print("| concurrent streams | requests | tokens/s | vs first level | latency p50 (s) | latency p99 (s) "
              "| first token p50 (s) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['concurrency']} | {r['requests']} | {r['tok_s']:.0f} | {r['tok_s'] / base:.1f}x | "
                  f"{r['p50']:.2f} | {r['p99']:.2f} | {r['ttft50']:.3f} |")
    if mix:
        bad = sum(n for k, n in mix["statuses"].items())
        bad_4xx = sum(n for k, n in mix["statuses"].items() if isinstance(k, int) and 400 <= k < 500)
        print(f"\nmixed run: {mix['concurrency']} streaming clients x {args.rounds} requests, {mix['hang_ups']} of "
              f"them hanging up after two chunks, one client sending bad requests throughout ({mix['wall']:.0f} s)\n")
        print("| valid completed | valid failed | text differs from Fuser.generate | hung up | bad requests "
              "| bad answered 4xx | responses with a traceback or path | slots held at the end | tokens/s "
              "| latency p50 / p99 (s) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {mix['completed']} | {len(mix['failed'])} | {len(mix['differ'])} | {mix['dropped']} | {bad} "
              f"| {bad_4xx} | {len(mix['leaks'])} | {mix['held']:g} | {mix['tok_s']:.0f} "
              f"| {mix['p50']:.2f} / {mix['p99']:.2f} |")
        print(f"\nbad-request status codes: {dict(sorted(mix['statuses'].items(), key=str))}")
        for what in ("failed", "differ", "leaks"):
            for item in mix[what][:3]:
                print(f"{what}: {item}")
        if mix["failed"] or mix["differ"] or mix["leaks"] or bad_4xx != bad or mix["held"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
