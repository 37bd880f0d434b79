"""The real model shapes `bench speed --shapes` builds at random (no download). No torch here:
the CLI reads the pair names for its --help."""

from __future__ import annotations

from enum import Enum

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tinyllama": (2048, 22, 32, 4, 5632, 32000),
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000),
    "llama2-13b": (5120, 40, 40, 40, 13824, 32000),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
    # Same vocabulary, so its output layer (256 x 49,152) is most of its cost: about 17M weights
    # read per step against 135M, the 5-10x cheaper small model a real small/large pair has.
    "smollm2-small": (256, 6, 4, 2, 768, 49152),
}
TIED = {"smollm2-135m", "smollm2-small"}  # SmolLM2 ties its input and output embeddings
PAIRS = {  # --shapes: (small, large)
    "smollm2-cpu": ("smollm2-small", "smollm2-135m"),
    "tinyllama-7b": ("tinyllama", "llama2-7b"),
    "tinyllama-13b": ("tinyllama", "llama2-13b"),
}
SHAPE_PAIRS = tuple(PAIRS)

ShapePair = Enum("ShapePair", [(name.replace("-", "_"), name) for name in PAIRS], type=str)  # --shapes' choices
