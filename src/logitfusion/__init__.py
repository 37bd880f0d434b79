"""logitfusion: fuse small fine-tuned experts into a large model's logits at every decoding step."""

from .engine.config import EngineConfig
from .engine.decoding import Generation, StepTrace, decode
from .engine.fusion import fuse, kl_targets, objective
from .engine.fuser import Fuser
from .engine.models import LoadError, LoadOptions, VocabularyMismatchError
from .engine.recipe import Recipe, RecipeError
from .engine.registry import SearchConfig, parse_method
from .engine.sampling import DecodingError, SamplingParams
from .engine.solvers import Alone, Choice, Dynamic, SolverError, Static

__version__ = "0.1.0"
__all__ = ["Fuser", "Recipe", "Generation", "SamplingParams", "EngineConfig", "StepTrace", "decode", "fuse", "objective",
           "kl_targets", "Static", "Dynamic", "Alone", "Choice", "parse_method", "SearchConfig", "LoadOptions",
           "LoadError", "VocabularyMismatchError", "RecipeError", "SolverError", "DecodingError"]
