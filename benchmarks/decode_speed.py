"""Fused decoding speed vs the large model alone, in one run. Same as `logitfusion bench speed`
(same options); see logitfusion/bench/speed.py for what is measured."""

import typer

from logitfusion.cli import _quiet
from logitfusion.cli.bench import bench_speed

if __name__ == "__main__":
    _quiet()  # as the `logitfusion` app does before every command
    typer.run(bench_speed)
