"""The speed benchmark runs end to end (numbers are not asserted: timing lives in the report)."""

from typer.testing import CliRunner

from logitfusion.cli import app


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
