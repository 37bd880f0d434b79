"""Fused decoding speed vs the large model alone, in one run. Same as `logitfusion bench speed`;
see logitfusion/bench/speed.py (`--help`) for what is measured."""

import sys

from logitfusion.cli import app

if __name__ == "__main__":
    app(["bench", "speed", *sys.argv[1:]], prog_name="decode_speed.py")
