"""A recipe's fusion with the large model in vLLM, behind `Fuser`'s Python shape:

    from logitfusion.vllm.fuser import VLLMFuser       # or logitfusion.vllm.backend.load(recipe)
    fuser = VLLMFuser.from_recipe("fusion.yaml")        # backend section: vllm.LLM arguments
    gens = fuser.generate(prompts, solver="static:1.0", max_new_tokens=32)   # list[Generation]
    fuser.close()

`generate(prompts, params, solver, engine, **options)` takes what `Fuser.generate` takes
(SamplingParams, a method string, EngineConfig, their fields by name) and returns `Generation`s.
All prompts of a call go to vLLM at once (its scheduler batches them, `backend.max_num_seqs` slots);
`batches` hands them back `engine.batch_size` at a time, for writers that save as they go.
`trace=True` gives each Generation its StepTrace list (the weights...), which vLLM's logits
processor writes to the trace folder this fuser started the engine with (traces.py). What vLLM does
not do here is refused by name: speculation, decoding without caches.
Scripts need a main guard (vLLM spawns its engine process).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import vllm

from ..engine.config import EngineConfig
from ..engine.decoding import Generation
from ..engine.fuser import SAMPLING_FIELDS, check_prompts, sampling_params
from ..engine.recipe import Recipe
from ..engine.registry import SearchConfig
from ..engine.sampling import DecodingError, SamplingParams
from ..engine.solvers import Solver, SolverError
from .offline import engine_args
from .settings import SOLVER_ARG, TRACE_ARG, TRACES_ENV, SettingsError, methods, recipe_file, trace_folder
from .traces import read_trace, trace_file

FINISH = {"length": "length", "abort": "cancelled"}  # vLLM's finish_reason -> Generation's ("stop": eos or stop)


@dataclass
class FrontModels:
    """What the front end holds of the models (vLLM's workers hold the weights): the large model's
    tokenizer and the experts' names."""

    tokenizer: Any
    expert_names: list[str]


class VLLMFuser:
    """vllm.LLM on the recipe's large model with the fusion processor; decodes like Fuser."""

    def __init__(self, llm: "vllm.LLM", path: str, solver: str | None = None, keep=None, traces: str | None = None):
        self.llm, self.path, self._keep = llm, path, keep  # keep: temporary folders the engine reads
        # The folder the engine's processor writes traces to: the one it was started with (an engine
        # started elsewhere: its additional_config's, else LOGITFUSION_TRACES as this process has it).
        config = getattr(llm.llm_engine.vllm_config, "additional_config", None)
        self.traces = Path(traces) if traces else trace_folder(config)
        self.methods = methods(path)
        self.recipe: Recipe = self.methods.recipe
        self.models = FrontModels(llm.get_tokenizer(), [e.name for e in self.recipe.experts])
        # id(Solver) -> (a weak reference to it, its method string; None: the recipe's). An id alone is
        # reused once its solver is freed, and a foreign solver would then pass as one this fuser built.
        self._specs: dict[int, tuple[weakref.ref, str | None]] = {}
        self.solver = self._solver(solver) if solver is not None else self._remember(self.recipe.build_solver(), None)

    @classmethod
    def from_recipe(cls, recipe: str | Path | Recipe | dict, solver: Solver | str | None = None,
                    **vllm_args: Any) -> "VLLMFuser":
        """Start vLLM on a recipe (a file, a Recipe or a dict); `vllm_args`: vllm.LLM arguments over
        the recipe's backend section. solver: the default method (a method string)."""
        if solver is not None and not isinstance(solver, str):
            raise SolverError("with the vLLM backend give the solver as a method string such as 'static:1.0' "
                              "(each request carries it to vLLM's workers by name)", field="solver")
        path, keep = recipe_file(recipe)
        if solver is not None:
            _check_spec(path, solver)  # before an engine starts
        # An environment variable, not additional_config: that is part of vLLM's compile-cache hash,
        # which a new folder per engine would change. vLLM's processes inherit it when they start.
        traces = tempfile.TemporaryDirectory(prefix="logitfusion-vllm-traces-")
        os.environ[TRACES_ENV] = traces.name
        return cls(vllm.LLM(**engine_args(path, **vllm_args)), path, solver, (keep, traces), traces.name)

    # -- the Fuser interface

    @property
    def expert_names(self) -> list[str]:
        return self.models.expert_names

    @property
    def engine(self) -> EngineConfig:
        return self.recipe.engine_config()

    def method(self, spec: str, search: SearchConfig | None = None) -> Solver:
        """A solver from a method string, checked for this engine. Grid or strategy overrides are not
        carried to vLLM's workers: set them in the recipe's solver section."""
        if search is not None and search != SearchConfig():
            raise SolverError("with the vLLM backend the dynamic grid, strategy and a_max come from the recipe's "
                              "solver section (the workers read the recipe); set them there", field="solver")
        return self._solver(spec)

    def sampling(self, **overrides) -> SamplingParams:
        return sampling_params(self.recipe, **overrides)

    def check_prompts(self, prompts: Sequence[str], solver: Solver | None = None) -> list[str]:
        """Each prompt a non-empty string (vLLM checks lengths against max_model_len)."""
        out = check_prompts(prompts)
        for i, p in enumerate(out):
            if not isinstance(p, str) or not p:
                raise DecodingError(f"prompt {i} must be a non-empty string, got {p!r}", field="prompt")
        return out

    def generate(self, prompts: str | Sequence[str], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 solver: Solver | str | None = None, engine: EngineConfig | None = None,
                 **options) -> list[Generation]:
        """Fuser.generate through vLLM: every prompt submitted at once, vLLM batching them."""
        prompts, per_prompt, spec, engine = self.request(prompts, params, solver, engine, **options)
        return self._run(prompts, per_prompt, spec, engine.trace)

    def batches(self, prompts: str | Sequence[str], params=None, solver: Solver | str | None = None,
                engine: EngineConfig | None = None, **options) -> Iterator[tuple[int, list[Generation]]]:
        """`generate` a chunk at a time: (index of the first, their generations). A chunk is
        engine.batch_size prompts, or vLLM's batch slots (max_num_seqs) when there are more of those,
        so that its scheduler has every slot to fill."""
        prompts, per_prompt, spec, engine = self.request(prompts, params, solver, engine, **options)
        size = max(engine.batch_size, self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
        for start in range(0, len(prompts), size):
            end = start + size
            yield start, self._run(prompts[start:end], per_prompt[start:end], spec, engine.trace)

    def request(self, prompts, params=None, solver: Solver | str | None = None, engine: EngineConfig | None = None,
                **options) -> tuple[list[str], list[SamplingParams], str | None, EngineConfig]:
        """The request checked where it enters: (prompts, each one's SamplingParams, the method
        string for vLLM, the engine settings), or a DecodingError / SolverError."""
        prompts = self.check_prompts(prompts)
        unknown = sorted(set(options) - SAMPLING_FIELDS - EngineConfig.names())
        if unknown:
            raise DecodingError(f"unknown generation option(s) {unknown}", field=unknown[0])
        engine = (engine or self.engine).replace(**{k: v for k, v in options.items() if k in EngineConfig.names()})
        _check_engine(engine)
        if engine.trace and self.traces is None:
            raise DecodingError("trace: this vLLM engine was started without a trace folder; start it with "
                                "VLLMFuser.from_recipe (or set LOGITFUSION_TRACES before vllm.LLM starts)",
                                field="trace")
        given = {k: v for k, v in options.items() if k in SAMPLING_FIELDS and v is not None}
        if not isinstance(params, (list, tuple)):
            per_prompt = dataclasses.replace(params or self.sampling(), **given).per_prompt(len(prompts))
        elif given or len(params) != len(prompts):
            raise DecodingError(f"give one SamplingParams per prompt ({len(prompts)}) and no sampling keywords "
                                "beside them", field="params")
        else:
            per_prompt = [p.check() for p in params]
        solver = self.solver if solver is None else solver
        return prompts, per_prompt, self._spec(solver), engine

    def close(self) -> None:
        """Stop vLLM's engine process now (else it stops when the process exits)."""
        self.llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> "VLLMFuser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inside

    def _remember(self, solver: Solver, spec: str | None) -> Solver:
        key = id(solver)

        def forget(ref: weakref.ref) -> None:
            if self._specs.get(key, (None,))[0] is ref:
                del self._specs[key]

        self._specs[key] = (weakref.ref(solver, forget), spec)
        return solver

    def _solver(self, spec: str) -> Solver:
        _check_spec(self.path, spec)
        return self._remember(self.recipe.method(spec), spec)

    def _spec(self, solver: Solver | str) -> str | None:
        if isinstance(solver, str):
            _check_spec(self.path, solver)
            self.recipe.method(solver)  # its errors, by name, before vLLM sees it
            return solver
        held = self._specs.get(id(solver))
        if held is None or held[0]() is not solver:
            raise SolverError("with the vLLM backend a solver must be a method string, or one this fuser built "
                              "(fuser.method(spec)): vLLM's workers build their own from its name", field="solver")
        return held[1]

    def _run(self, prompts: list[str], per_prompt: list[SamplingParams], spec: str | None,
             trace: bool = False) -> list[Generation]:
        extra = {SOLVER_ARG: spec} if spec is not None else {}
        # One key per request: the name of the file the processor writes its steps to.
        keys = [f"{uuid.uuid4().hex}-{i}" for i in range(len(prompts))] if trace else [None] * len(prompts)
        params = [vllm_params(p, (extra | {TRACE_ARG: k} if k else extra) or None) for p, k in zip(per_prompt, keys)]
        try:
            try:
                outs = self.llm.generate(prompts, params, use_tqdm=False)
            except ValueError as e:  # vLLM's request checks (a prompt longer than max_model_len...)
                raise DecodingError(f"vLLM refused the request: {e}", field="prompt") from None
            gens = [generation(p, o.outputs[0], self.models.tokenizer) for p, o in zip(prompts, outs)]
            for g, key in zip(gens, keys):
                if key is not None:
                    g.trace = read_trace(trace_file(self.traces, key), len(g.token_ids))
        finally:  # read or not, a trace file is the caller's only once
            for key in filter(None, keys):
                trace_file(self.traces, key).unlink(missing_ok=True)
        return gens


def _check_spec(path: str, spec: str) -> None:
    try:
        methods(path).of_request({SOLVER_ARG: spec})
    except SettingsError as e:
        raise SolverError(str(e).replace(f"extra_args.{SOLVER_ARG}", "solver"), field="solver") from None


def _check_engine(engine: EngineConfig) -> None:
    for name, bad, why in (("speculate", engine.speculate > 1, "speculative fused decoding runs in logitfusion's own "
                            "engine only (vLLM refuses custom logits processors with its speculative decoding)"),
                           ("use_cache", not engine.use_cache, "vLLM always decodes with its KV cache")):
        if bad:
            raise DecodingError(f"{name}: {why}; use backend.kind hf for it", field=name)


def vllm_params(p: SamplingParams, extra: dict | None) -> "vllm.SamplingParams":
    """Our SamplingParams (one prompt's, its own seed) as vLLM's."""
    return vllm.SamplingParams(max_tokens=p.max_new_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                               seed=p.seed, stop=list(p.stop) or None, ignore_eos=p.ignore_eos, extra_args=extra)


def generation(prompt: str, out, tokenizer) -> Generation:
    """A vLLM CompletionOutput as a Generation (finish "eos" at the end-of-text token, "stop" at a
    stop string). The text is the engine's, tokenizer.decode(tokens, skip_special_tokens=True), where
    vLLM's would hold back a last incomplete UTF-8 character; cut at the stop string, vLLM's."""
    reason = FINISH.get(out.finish_reason)
    if reason is None:
        reason = "stop" if isinstance(out.stop_reason, str) else "eos"
    ids = list(out.token_ids)
    text = out.text if reason == "stop" else tokenizer.decode(ids, skip_special_tokens=True)
    return Generation(prompt, text, ids, reason)
