"""`python -m logitfusion.cli` is the `logitfusion` command."""

from . import app

app()
