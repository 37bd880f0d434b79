"""logitfusion: fuse small fine-tuned experts into a large model's logits at every decoding step."""

from .decoding import DecodingError, Generation, SamplingParams, StepTrace, decode
from .fusion import fuse, kl_targets, objective
from .fuser import Fuser
from .models import LoadError, LoadOptions, VocabularyMismatchError
from .recipe import Recipe, RecipeError
from .solvers import Alone, Choice, Dynamic, SolverError, Static, parse_method

__version__ = "0.1.0"
__all__ = ["Fuser", "Recipe", "Generation", "SamplingParams", "StepTrace", "decode", "fuse", "objective",
           "kl_targets", "Static", "Dynamic", "Alone", "Choice", "parse_method", "LoadOptions",
           "LoadError", "VocabularyMismatchError", "RecipeError", "SolverError", "DecodingError"]
