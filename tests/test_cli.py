"""The `logitfusion` CLI end to end, on the toy family (real models, real files)."""

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from logitfusion.cli import app


pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it


runner = CliRunner()


@pytest.fixture(scope="module")
def recipe_file(family, tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "fusion.yaml"
    path.write_text(yaml.safe_dump({
        "large": {"path": family["large"]},
        "small": {"path": family["small"]},
        "experts": [{"name": "expert1", "path": family["experts"]["expert1"]},
                    {"name": "lora1", "path": family["experts"]["lora1"]}],
        "solver": {"kind": "dynamic", "grid": {"start": 0, "stop": 2, "step": 0.25}},
        "generation": {"max_new_tokens": 6},
    }))
    return path


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_jsonl_with_trace_and_plot(recipe_file, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": p})
                                 for i, p in enumerate(["the cat", "Question: 2 plus 3? Answer:", "a"])))
    out, png = tmp_path / "out.jsonl", tmp_path / "w.png"
    r = run("generate", "--recipe", recipe_file, "--input", prompts, "--output", out, "--trace",
            "--plot-weights", png, "--batch-size", 2)
    assert r.exit_code == 0, r.output
    rows = read_jsonl(out)
    assert [row["id"] for row in rows] == ["q0", "q1", "q2"]
    for row in rows:
        assert len(row["token_ids"]) == len(row["trace"]) <= 6
        step = row["trace"][0]
        assert len(step["weights"]) == 2 and all(0 <= w <= 2 for w in step["weights"])
        assert step["objective"] >= 0
        assert {"large", "small", "expert:expert1", "expert:lora1", "fused"} <= set(step["top"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_resumes_and_repairs_a_cut_line(recipe_file, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["one", "two", "three", "four"]))
    out = tmp_path / "out.jsonl"
    assert run("generate", "-r", recipe_file, "-i", prompts, "-o", out, "--batch-size", 4).exit_code == 0
    full = read_jsonl(out)
    # Simulate a crash: keep two records and half of the third line.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    r = run("generate", "-r", recipe_file, "-i", prompts, "-o", out, "--batch-size", 4)
    assert r.exit_code == 0, r.output
    assert "resuming: 2 of 4" in r.output
    again = read_jsonl(out)
    assert sorted(row["id"] for row in again) == ["0", "1", "2", "3"]
    assert sorted(again, key=lambda row: row["id"]) == full  # greedy: the redone records are identical


def test_generate_from_flags_static_matches_python_api(family):
    r = run("generate", "--large", family["large"], "--small", family["small"],
            "--expert", f"expert1={family['experts']['expert1']}", "--alpha", 1.0,
            "--prompt", "the dog", "--max-new-tokens", 5)
    assert r.exit_code == 0, r.output
    from logitfusion import Fuser
    f = Fuser.from_pretrained(family["large"], family["small"], {"expert1": family["experts"]["expert1"]})
    expected = f.generate("the dog", solver="static:1.0", max_new_tokens=5)[0].text
    assert r.stdout.rstrip("\n").endswith(expected)


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x"], "no models"),
    (["--recipe", "/nonexistent/r.yaml", "--prompt", "x"], "not found"),
    (["--large", "/nonexistent/model", "--prompt", "x"], "does not exist"),
    (["--large", "L", "--expert", "justapath", "--prompt", "x"], "NAME=PATH"),
    (["--large", "L", "--grid", "0:2:0", "--prompt", "x"], "step"),
    (["--large", "L"], "--prompt"),
])
def test_generate_bad_input_is_a_clear_error(args, message, tmp_path):
    r = run("generate", *args)
    assert r.exit_code == 2
    assert message in r.output


def test_bad_solver_fails_before_any_output(recipe_file, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    out = tmp_path / "out.jsonl"
    r = run("generate", "-r", recipe_file, "-i", prompts, "-o", out)
    assert r.exit_code == 2 and "prompt 1 is empty" in r.output
    assert not out.exists()
    r = run("generate", "-r", recipe_file, "-i", prompts, "-o", out, "--solver", "expert:nobody")
    assert r.exit_code == 2 and "unknown expert" in r.output
    assert not out.exists()


def test_recipe_init_and_check(family, tmp_path):
    path = tmp_path / "r.yaml"
    r = run("recipe", "init", path, "--large", family["large"], "--small", family["small"],
            "--expert", f"e1={family['experts']['expert1']}")
    assert r.exit_code == 0, r.output
    r = run("recipe", "check", path, "--load")
    assert r.exit_code == 0, r.output
    assert "vocabularies match" in r.output
    data = yaml.safe_load(path.read_text())
    data["solver"]["gird"] = [0, 1]
    path.write_text(yaml.safe_dump(data))
    r = run("recipe", "check", path)
    assert r.exit_code == 2 and "solver.gird" in r.output


def test_console_script_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "logitfusion.cli", "generate", "--help"],
                         capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""}, check=True).stdout
    for option in ["--recipe", "--solver", "--alpha", "--grid", "--trace", "--plot-weights", "--expert",
                   "--input", "--output", "--seed", "--stop", "--device-map", "--trust-remote-code"]:
        assert option in out


def test_the_command_table_lists_every_command_in_order():
    out = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    names = ["generate", "demo", "version", "serve", "eval", "finetune", "merge", "convert",
             "recipe", "bench", "vocab", "delta", "zoo"]
    positions = [out.index(f"│ {n} ") for n in names]
    assert positions == sorted(positions)
    for group, commands in {"recipe": ["check", "init"], "bench": ["speed", "paper", "cmc"], "vocab": ["map"],
                            "delta": ["train"], "zoo": ["build", "info"]}.items():
        sub = runner.invoke(app, [group, "--help"], env={"COLUMNS": "200"}).output
        positions = [sub.index(f"│ {c} ") for c in commands]
        assert positions == sorted(positions), group


def test_read_jsonl_skips_blank_lines_stops_at_limit_and_names_a_bad_line(tmp_path):
    from logitfusion.eval.records import RecordsError, read_jsonl
    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\nnot json\n')
    assert read_jsonl(p, limit=2) == [{"a": 1}, {"a": 2}]
    with pytest.raises(RecordsError, match=r"rows.jsonl:5: not valid JSON"):
        read_jsonl(p)
    with pytest.raises(RecordsError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")
