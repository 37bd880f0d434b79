"""The paper bench: its cells, the gap-closed maths, the report, and bad input. The run itself is
exercised on the zoo by `logitfusion bench paper` (docs/results); here nothing trains."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from logitfusion.bench import paper as bench, world
from logitfusion.cli import app


def test_gap_closed_both_definitions():
    paper, strict = bench.gap_closed(fused=0.5, base=0.2, fft=0.8)
    assert paper == pytest.approx(0.625) and strict == pytest.approx(0.5)
    assert bench.gap_closed(None, 0.2, 0.8) == (None, None)
    assert bench.gap_closed(0.5, 0.8, 0.8)[1] is None  # no gap to close


def test_cells_cover_every_table_and_share_models(tmp_path):
    for t in world.TASKS:
        (tmp_path / "data" / t).mkdir(parents=True)
        (tmp_path / "data" / t / "train.jsonl").write_text(
            "".join(json.dumps({"prompt": f"P{i}", "completion": f" C{i}"}) + "\n" for i in range(5)))
    cells = bench.cells(tmp_path)
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    assert {c.table for c in cells} == set(bench.TABLES)
    tops = [json.loads(c.recipe)["solver"]["grid"]["stop"] for c in cells if c.table == "range" and c.task == "qa"]
    assert tops == list(bench.A_MAX_CHOICES)
    single = [c for c in cells if c.table == "single" and c.task == "math"]
    assert [c.method for c in single] == ["large", "large", "large", "large", "expert:math", "static:0.5",
                                          "static:1.0", "static:1.5", "dynamic"]
    assert json.loads(single[0].recipe)["large"]["path"].endswith("models/small")  # the small base row
    # the base and the five expert-based methods of a task load one model set
    assert len({c.recipe for c in single if c.label not in ("small base", "large FFT", "large LoRA")}) == 1
    icl = next(c for c in cells if c.table == "icl" and c.label.endswith("+ dynamic fusion") and c.task == "qa")
    recipe = json.loads(icl.recipe)
    assert recipe["large"]["template"].startswith("P0 C0\n\nP1 C1\n\nP2 C2\n\n")
    assert recipe["large"]["template"].endswith("{prompt}")
    assert recipe["experts"][0].get("template", "{prompt}") == "{prompt}"  # experts stay zero-shot


def _records(values: dict[str, float]) -> list[dict]:
    out = []
    for key, v in values.items():
        table, label, task = key.split("|")
        out.append({"key": key, "table": table, "label": label, "world_task": task, "value": v,
                    "metric": "exact_match,none", "seconds": 1.0})
    return out


def test_report_states_gaps_and_losses(tmp_path):
    vals = {}
    for t in world.TASKS:
        vals |= {f"single|large base|{t}": 0.1, f"single|large FFT|{t}": 0.9, f"single|small expert|{t}": 0.5,
                 f"single|proxy-tuning (a=1)|{t}": 0.6, f"single|dynamic (ours)|{t}": 0.5 if t == "qa" else 0.7}
    text = bench.report(_records(vals), tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| dynamic (ours)"))
    avg = (0.5 + 4 * 0.7) / 5
    assert f"{100 * avg:.1f}" in row
    assert f"{100 * avg / 0.9:.1f}%" in row and f"{100 * (avg - 0.1) / 0.8:.1f}%" in row
    assert "dynamic fusion scores below **proxy-tuning (a=1)** on: qa." in text


def test_paired_interval_holds_the_difference_and_narrows_with_pairing():
    a = [[1.0, 0.0, 1.0, 1.0] * 25]  # [100]
    point, lo, hi = bench.paired_interval(a, a)
    assert point == lo == hi == 0.0  # identical methods: no difference in any resample
    b = [[1.0, 0.0, 0.0, 1.0] * 25]
    point, lo, hi = bench.paired_interval(a, b)
    assert point == pytest.approx(0.25) and lo < 0.25 < hi and lo > 0.1
    # two tasks: the average of the per-task differences
    point, _, _ = bench.paired_interval([a[0], a[0]], [b[0], a[0]])
    assert point == pytest.approx(0.125)


def test_report_shows_paired_intervals_and_the_split(tmp_path):
    recs = _records({f"single|{lab}|qa": v for lab, v in (("large base", 0.2), ("small expert", 0.4),
                                                           ("dynamic (ours)", 0.6), ("proxy-tuning (a=1)", 0.5))})
    per_doc = {"large base": [0, 1, 0, 0, 0] * 20, "small expert": [1, 1, 0, 0, 0] * 20,
               "dynamic (ours)": [1, 1, 1, 0, 0] * 20, "proxy-tuning (a=1)": [1, 1, 0, 1, 0] * 20}
    for r in recs:
        r |= {"scores": per_doc[r["label"]], "split": "validation"}
    text = bench.report(recs, tmp_path)
    assert "validation splits" in text
    row = next(line for line in text.splitlines() if line.startswith("| dynamic (ours) - small expert |"))
    assert row.count("+20.0 [") == 2  # qa and the average


def test_regime_requirements():
    vals = {}
    for t in world.TASKS:
        vals |= {f"single|small base|{t}": 0.1, f"single|large base|{t}": 0.3, f"single|large FFT|{t}": 0.5,
                 f"single|small expert|{t}": 0.3 if t != "qa" else 0.15}
    records = {r["key"]: r for r in _records(vals)}
    checks = {r: ok for r, _, ok in bench.regime(records, list(world.TASKS))}
    assert list(checks.values()) == [True, True, True, False]  # the qa expert gains only 5 points
    assert "| every small expert >= small base + 10 on its task | math +20.0" in bench.report(_records(vals), Path("."))


def test_search_range_is_chosen_on_validation_and_shown_on_test(tmp_path):
    def recs(values: dict[float, float], split: str) -> list[dict]:
        out = []
        for x, v in values.items():
            label = "dynamic (ours)" if x == bench.PAPER_A_MAX else bench.range_label(x)
            table = "single" if x == bench.PAPER_A_MAX else "range"
            out.append({"key": f"{table}|{label}|qa", "table": table, "label": label, "world_task": "qa", "value": v,
                        "metric": "exact_match,none", "split": split, "scores": [v] * 10})
        return out

    validation = recs({0.5: 0.3, 1.0: 0.5, 1.5: 0.5, 2.0: 0.4}, "validation")  # tie 1.0 / 1.5: the larger
    assert bench.chosen_ranges({r["key"]: r for r in validation}, ["qa"]) == {"qa": 1.5}
    test = recs({0.5: 0.1, 1.0: 0.2, 1.5: 0.3, 2.0: 0.6}, "test")  # on test the paper's range does best
    text = bench.report(test, tmp_path, validation=validation)
    row = next(line for line in text.splitlines() if line.startswith("| dynamic, range chosen on validation |"))
    assert "| 30.0 |" in row  # the test score of the range chosen on validation, not the best test range
    assert "chosen on the validation split (qa 1.5)" in text and "optimistic" not in text


def test_bench_refuses_to_mix_splits(tmp_path):
    (tmp_path / "paper.jsonl").write_text(json.dumps({"key": "single|large base|qa", "split": "test"}) + "\n")
    with pytest.raises(ValueError, match="validation results to another --out"):
        bench.run(tmp_path, tmp_path, ["qa"], split="validation")


def test_bench_paper_bad_input(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "paper", "--root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no zoo build" in r.output
    r = runner.invoke(app, ["bench", "paper", "--root", str(tmp_path), "--tasks", "math,chess"])
    assert r.exit_code == 2 and "chess" in r.output
    r = runner.invoke(app, ["bench", "paper", "--root", str(tmp_path), "--limit", "0"])
    assert r.exit_code == 2 and "--limit" in r.output
    r = runner.invoke(app, ["bench", "paper", "--root", str(tmp_path), "--split", "train"])
    assert r.exit_code == 2 and "--split" in r.output


def test_report_shows_math_final_number_beside_genuine_derivations(tmp_path):
    recs = _records({"single|small expert|math": 0.25, "single|dynamic (ours)|math": 0.10, "single|small expert|qa": 0.2})
    for r, genuine in zip(recs, (0.08, 0.0, None)):
        if genuine is not None:
            r["metrics"] = {"exact_match,none": r["value"], "genuine,none": genuine}
    text = bench.report(recs, tmp_path)
    assert "## Math: final number and genuine derivations" in text
    assert "| single | small expert | 25.0 | 8.0 |" in text and "| single | dynamic (ours) | 10.0 | 0.0 |" in text
    assert "Math: final number" not in bench.report(_records({"single|small expert|qa": 0.2}), tmp_path)
