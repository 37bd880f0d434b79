"""The speed benchmark runs end to end (numbers are not asserted: timing lives in the report)."""

import pytest
from typer.testing import CliRunner

from logitfusion.cli import app


pytestmark = pytest.mark.slow  # end to end: `make test-fast` skips it


def test_bench_speed_prints_every_ratio(tmp_path, capsys):
    result = CliRunner().invoke(app, ["bench", "speed", "--tokens", "3",
                                      "--batch", "2", "--repeats", "1", "--experts", "2", "--speculate", "2", "--long-tokens", "6"])
    assert result.exit_code == 0, result.output
    out = result.output + capsys.readouterr().out
    for row in ["HF generate, large alone", "ours, large alone", "ours, dynamic, 1 expert, speculative k=2",
                "ours, dynamic joint, 2 experts", "component floor, large + small + 2 experts",
                "naive / ours (dynamic fast, 2 experts, batch 2)", "small + LoRA experts, stacked forward",
                "same, PEFT mixed-adapter forward",
                "ours, dynamic, 1 expert, speculative sampling (T=1) k=2", "tokens per sequence per large-model forward",
                "ours, dynamic fast, 2 experts, separate forwards", "small + full experts, stacked forward",
                "the weight solver alone", "room reserved up front vs torch.cat"]:
        assert row in out, row


def test_bench_speed_on_random_models_of_given_shapes(tmp_path, monkeypatch, capsys):
    """The --shapes path (random models of real shapes, meant for a GPU) run end to end at toy
    sizes, so a lent GPU's minutes are not spent finding its bugs."""
    import tempfile

    from logitfusion.bench import speed
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(speed, "SHAPES", {"tinyllama": (32, 2, 4, 2, 64, 32000), "llama2-13b": (64, 2, 4, 4, 128, 32000)})
    result = CliRunner().invoke(app, ["bench", "speed", "--shapes", "tinyllama-13b", "--tokens", "2", "--batch", "1",
                                      "--repeats", "1", "--experts", "2", "--speculate", "2", "--long-tokens", "4",
                                      "--no-naive"])
    assert result.exit_code == 0, result.output
    out = result.output + capsys.readouterr().out
    assert "# models: tinyllama-13b" in out and "small + full experts, stacked forward" in out
    assert "vocab 32000;" in out  # the tokenizer is padded to the models' vocabulary
    assert (tmp_path / "logitfusion-shapes-tinyllama-13b-float32" / "llama2-13b" / "config.json").exists()


def test_the_cpu_preset_is_smollm2_shaped_and_its_small_model_is_several_times_cheaper():
    """The numbers of the real shapes (checked against SmolLM2-135M's config: 134.5M parameters with
    tied embeddings), and a small model of the same vocabulary 5-10x smaller, so 5-10x fewer
    weights read per step."""
    from logitfusion.bench import speed

    def params(name):
        hidden, layers, heads, kv, inter, vocab = speed.SHAPES[name]
        head = hidden // heads
        per_layer = 2 * hidden * hidden + 2 * hidden * kv * head + 3 * hidden * inter + 2 * hidden
        return vocab * hidden + layers * per_layer + hidden  # tied: one embedding matrix

    small, large = speed.PAIRS["smollm2-cpu"]
    assert abs(params(large) - 134_515_008) < 1e-3 * 134_515_008
    assert 5 <= params(large) / params(small) <= 10
    assert speed.SHAPES[small][-1] == speed.SHAPES[large][-1] and {small, large} <= speed.TIED


def test_bench_speed_takes_any_models_or_a_recipe(family, tmp_path, capsys):
    import yaml
    experts = [f"{name}={path}" for name, path in list(family["experts"].items())[:2]]
    args = ["bench", "speed", "--tokens", "2", "--batch", "1", "--repeats", "1", "--speculate", "0",
            "--long-tokens", "4", "--no-naive"]
    result = CliRunner().invoke(app, args + ["--large", family["large"], "--small", family["small"],
                                             *[x for e in experts for x in ("--expert", e)]])
    assert result.exit_code == 0, result.output
    out = result.output + capsys.readouterr().out
    assert f"# models: {family['large']} + {family['small']} + 2 experts" in out
    assert "ours, dynamic joint, 2 experts" in out
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"large": {"path": family["large"]}, "small": {"path": family["small"]},
                                      "experts": [{"name": "e1", "path": list(family["experts"].values())[0]}]}))
    result = CliRunner().invoke(app, args + ["--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "+ 1 experts" in result.output + capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--large", "L"], "give all three"),
    (["--shapes", "smollm2-cpu", "--recipe", "r.yaml"], "choose one source of models"),
    (["--large", "/nowhere/L", "--small", "/nowhere/S", "--expert", "=E"], "experts.0.name"),
    (["--large", "/nowhere/L", "--small", "/nowhere/S", "--expert", "/nowhere/E"], "/nowhere/L"),
    (["--recipe", "/nowhere/r.yaml"], "/nowhere/r.yaml"),
])
def test_bench_speed_refuses_mixed_or_partial_model_sources(extra, message):
    result = CliRunner().invoke(app, ["bench", "speed", *extra])
    assert result.exit_code != 0 and message in result.output, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a clean exit, not a traceback


def test_the_cli_offers_exactly_the_shape_pairs_of_the_bench():
    """The CLI takes the pairs from the bench's torch-free shapes module (--help needs no torch)."""
    import ast
    from pathlib import Path

    from logitfusion.bench import shapes, speed
    from logitfusion.cli.bench import ShapePair
    assert [p.value for p in ShapePair] == list(speed.SHAPE_PAIRS) == list(shapes.PAIRS)
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(Path(shapes.__file__).read_text()))
                if isinstance(n, ast.Import)}
    imported |= {n.module.split(".")[0] for n in ast.walk(ast.parse(Path(shapes.__file__).read_text()))
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "enum"}


def test_bench_speed_times_the_given_lora_expert_and_reports_progress(family, tmp_path, monkeypatch, capsys):
    """Given models: the LoRA table times the given adapter (no random adapters are made), and
    progress goes to stderr while the report goes to stdout."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = ["bench", "speed", "--tokens", "2", "--batch", "1", "--repeats", "1", "--speculate", "0",
            "--long-tokens", "4", "--no-naive", "--large", family["large"], "--small", family["small"],
            "--expert", f"lora1={family['experts']['lora1']}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    captured = capsys.readouterr()
    out = result.output + captured.out + captured.err
    assert "the given experts that are LoRA adapters of the small base (lora1)" in out
    assert "random adapters" not in out and not list(tmp_path.glob("logitfusion-bench-lora-*"))
    assert "[bench speed] loading the models" in out and "[bench speed] batch 1: round 1/1" in out
