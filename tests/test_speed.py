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
    assert (tmp_path / "logitfusion-shapes-tinyllama-13b-float32" / "llama2-13b" / "config.json").exists()
