"""Fused decoding speed vs the large model alone, in one run. Same as `logitfusion bench speed`;
see logitfusion/speed.py (`--help`) for what is measured."""

from logitfusion.bench.speed import main

if __name__ == "__main__":
    main()
