"""Crash-resume of `logitfusion generate`: SIGKILL it mid-run several times, resume, and compare.

    .venv/bin/python benchmarks/crash_resume.py [--prompts 48] [--kills 5] [--batch-size 4] [--zoo ROOT]

Runs `generate` over the first --prompts math test prompts of the bundled zoo (large + small +
the math expert, dynamic fusion, greedy) once without interruption, then again into a fresh
output file, killing the process with SIGKILL at a random moment after it has written at least
one new record, --kills times, and finally lets it finish. Reports the records lost (ids missing),
duplicated (ids written twice), differing from the uninterrupted run, and the lines repaired (a
last line cut short by a kill). Exits 1 if anything was lost, duplicated or differs.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from logitfusion.bench import zoo


def run(cmd: list[str], out: Path, kill_after_new: int | None, rng: random.Random) -> tuple[int, bool]:
    """Run generate; with kill_after_new, SIGKILL it a random moment after that many new records.
    Returns (records in the file afterwards, whether its last line was cut)."""
    before = _count(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_after_new is not None:
        while proc.poll() is None and _count(out) < before + kill_after_new:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # anywhere in the next batch, mid-write included
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    text = out.read_text() if out.exists() else ""
    return _count(out), bool(text) and not text.endswith("\n")


def _count(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zoo", type=Path, default=zoo.BUNDLED)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="crash_resume_"))
    recipe = work / "fusion.yaml"
    recipe.write_text(yaml.safe_dump({
        "large": {"path": str(args.zoo / "models" / "large")}, "small": {"path": str(args.zoo / "models" / "small")},
        "experts": [{"name": "math", "path": str(args.zoo / "experts" / "math")}], "solver": {"kind": "dynamic"},
        "generation": {"max_new_tokens": args.tokens}}))
    lines = (args.zoo / "data" / "math" / "test.jsonl").read_text().splitlines()[: args.prompts]
    src = work / "in.jsonl"
    src.write_text("".join(json.dumps({"id": json.loads(x)["id"], "prompt": json.loads(x)["prompt"]}) + "\n"
                           for x in lines))
    exe = str(Path(sys.executable).with_name("logitfusion"))

    def cmd(out: Path) -> list[str]:
        return [exe, "generate", "-r", str(recipe), "-i", str(src), "-o", str(out), "--batch-size",
                str(args.batch_size)]

    clean, crashed = work / "clean.jsonl", work / "crashed.jsonl"
    t0 = time.perf_counter()
    run(cmd(clean), clean, None, rng)
    clean_s = time.perf_counter() - t0
    cut, kills = 0, 0
    for _ in range(args.kills):
        n, was_cut = run(cmd(crashed), crashed, 1, rng)
        kills += 1
        cut += was_cut
        if n >= args.prompts:
            break
    run(cmd(crashed), crashed, None, rng)
    want = {r["id"]: r for r in map(json.loads, clean.read_text().splitlines())}
    got = [json.loads(x) for x in crashed.read_text().splitlines()]
    ids = [r["id"] for r in got]
    lost = sorted(set(want) - set(ids))
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    differ = sorted(r["id"] for r in got if r["id"] in want and r["text"] != want[r["id"]]["text"])
    print(f"crash-resume of `logitfusion generate`: {args.prompts} prompts, batch size {args.batch_size}, "
          f"{args.tokens} tokens, {kills} SIGKILLs (an uninterrupted run takes {clean_s:.0f} s)\n")
    print("| records | SIGKILLs | cut lines repaired | lost | duplicated | differ from the uninterrupted run |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(got)} | {kills} | {cut} | {len(lost)} | {len(duplicated)} | {len(differ)} |")
    if lost or duplicated or differ or len(got) != args.prompts:
        print(f"lost {lost[:5]}, duplicated {duplicated[:5]}, differ {differ[:5]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
