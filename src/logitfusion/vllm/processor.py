"""Fusion as a vLLM V1 logits processor: vLLM runs the large model, this runs the small side.

vLLM builds one `FusionLogitsProcessor` per worker (each tensor-parallel rank runs the small side
on the same rows, and gets the same fused logits: the small models and the solver are
deterministic for the same inputs) and tells it, before each step, how its persistent batch
changed (`BatchUpdate`: rows added with their prompt and a live reference to their output ids,
removed, moved). `apply` gets every running row's logits [num_rows, vocab] and returns them
fused, row by row with each request's method, through `engine.rows.FusionRows` (the small base and
experts batched across rows, each row caught up on the tokens vLLM produced since the last step).
A request with a trace key (extra_args.trace) has each step's StepTrace appended to its file in
the engine's trace folder (traces.py), by tensor-parallel rank 0.

Register it with `vllm.LLM(model=LARGE, logits_processors=[FusionLogitsProcessor],
additional_config={"logitfusion_recipe": RECIPE})` (offline.fused_llm does) or, on vLLM's OpenAI
server, `--logits-processors logitfusion.vllm.processor:FusionLogitsProcessor` (the `serve`
launcher). It runs under vLLM's V1 model runner (the one vLLM's CPU build uses; on a GPU with
vLLM >= 0.32 set VLLM_USE_V2_MODEL_RUNNER=0).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ..engine.config import EngineConfig
from ..engine.errors import DecodingError, SolverError
from ..engine.members import ModelSet
from ..engine.models import load_model_set
from ..engine.recipe import Recipe
from ..engine.rows import FusionRows
from .settings import SOLVER_ARG, TRACE_ARG, Methods, SettingsError, methods, recipe_path, trace_folder, trace_key
from .traces import trace_file, write_header, write_steps

log = logging.getLogger(__name__)


def load_side(recipe: Recipe, device: torch.device | None = None) -> ModelSet:
    """The recipe's models for the processor: the small base, experts and delta, and the large
    model's tokenizer (vLLM runs the large model itself). On the worker's own device when the
    recipe names that kind of device without an index (`cuda`: each tensor-parallel rank its GPU)."""
    dump = lambda spec: spec.model_dump() if spec else None  # noqa: E731
    opts = recipe.load_options()
    if device is not None and opts.device_map is None and opts.device == device.type and device.index is not None:
        opts = dataclasses.replace(opts, device=str(device))
    return load_model_set(dump(recipe.large), dump(recipe.small), [e.model_dump() for e in recipe.experts],
                          opts, delta=dump(recipe.delta), large_weights=False)


@dataclass
class Slot:
    """One row of vLLM's persistent batch, as the processor tracks it."""

    key: int  # the row's key in FusionRows (unique per add: a preempted request comes back as new)
    output: list[int]  # vLLM's live list of the request's output ids
    fused: bool  # False: the large model alone (the logits pass through)
    trace: Path | None = None  # the file its steps go to (None: not traced, or not by this rank)


class FusionLogitsProcessor(LogitsProcessor):
    """z_large + sum_t a_t (z_t - z_S) on the rows vLLM hands in (method.md §2-4)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """A request's method (extra_args.solver), checked in the front-end process against the
        recipe there (LOGITFUSION_RECIPE): a bad one fails the request (HTTP 400), not the engine."""
        args = sampling_params.extra_args or {}
        try:
            trace_key(args)
            if SOLVER_ARG in args:  # else the recipe's own solver, checked when the engine started
                methods(recipe_path()).of_request(args)
        except SettingsError as e:
            raise ValueError(str(e)) from None

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.methods: Methods = methods(recipe_path(getattr(vllm_config, "additional_config", None)))
        self.rows: FusionRows | None = None
        if self.methods.runner is not None:
            self.models = load_side(self.methods.recipe, device)
            self.rows = FusionRows(self.models, self.methods.runner, EngineConfig(trace=False))
        self.slots: dict[int, Slot] = {}  # vLLM's row index -> its slot
        self.keys = itertools.count()
        # Every tensor-parallel rank fuses the same rows; one writes their traces.
        self.traces = trace_folder(getattr(vllm_config, "additional_config", None)) if _first_rank() else None

    def _trace_file(self, extra_args) -> Path | None:
        """Where the request's steps go, or None (not traced, or not on this rank)."""
        try:
            key = trace_key(extra_args)
        except SettingsError as e:  # checked in the front end; a request that got here anyway is not traced
            log.error("logitfusion: %s", e)
            return None
        if key is None or self.traces is None:
            if key is not None and _first_rank():
                log.error("logitfusion: request asks for a trace (extra_args.%s) but this engine has no trace folder "
                          "(LOGITFUSION_TRACES)", TRACE_ARG)
            return None
        return trace_file(self.traces, key)

    def is_argmax_invariant(self) -> bool:
        return False  # fusion changes the greedy token: vLLM must call apply for greedy rows too

    # -- the batch changing (vLLM's order: removed, added, moved)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self._drop(index)  # an added row may take the place of one that is still listed
            self.slots[index] = self._slot(params, prompt_ids, output_ids)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                first, second = self.slots.pop(a, None), self.slots.pop(b, None)
                self.slots.update({i: s for i, s in ((b, first), (a, second)) if s is not None})
            else:  # a -> b, replacing whatever was at b
                self._drop(b)
                if (moved := self.slots.pop(a, None)) is not None:
                    self.slots[b] = moved

    def _slot(self, params, prompt_ids: list[int] | None, output_ids: list[int]) -> Slot:
        trace = self._trace_file(params.extra_args)
        slot = self._fused_slot(params, prompt_ids, output_ids, trace is not None)
        if trace is not None:  # written again when a preempted request comes back: the last one holds
            write_header(trace, slot.fused)
            slot.trace = trace
        return slot

    def _fused_slot(self, params, prompt_ids: list[int] | None, output_ids: list[int], trace: bool) -> Slot:
        key = next(self.keys)
        solver = self.methods.of_request(params.extra_args) if self.rows is not None else None
        if solver is None:
            return Slot(key, output_ids, False)
        if not prompt_ids:
            log.warning("logitfusion: a request without prompt token ids (prompt embeddings?) decodes from the "
                        "large model alone")
            return Slot(key, output_ids, False)
        try:
            self.rows.add(key, list(prompt_ids), solver, trace=trace)
        except (DecodingError, SolverError) as e:
            # Found only here (a prompt too long for a small model's context...): raising would stop
            # the engine and every request in it, so this one request decodes unfused, loudly.
            log.error("logitfusion: a request decodes from the large model alone, not fused: %s", e)
            return Slot(key, output_ids, False)
        return Slot(key, output_ids, True)

    def _drop(self, index: int) -> None:
        slot = self.slots.pop(index, None)
        if slot is not None and slot.fused:
            self.rows.remove(slot.key)

    # -- the step

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Fused logits for every fused row; the large model's own for the others. Columns past the
        tokenizer's vocabulary (a model's padded rows) are -inf for fused rows, as in the engine."""
        fused = sorted(i for i, s in self.slots.items() if s.fused and i < logits.shape[0])
        if not fused:
            return logits
        vocab = self.models.vocab_size
        index = torch.tensor(fused, device=logits.device)
        z = self.rows.apply([self.slots[i].key for i in fused], [self.slots[i].output for i in fused],
                            logits[index, :vocab].float())
        logits[index, :vocab] = z.to(logits.dtype)
        if logits.shape[1] > vocab:
            logits[index, vocab:] = float("-inf")
        for i in fused:  # before vLLM samples: each step is on disk before its token is handed out
            if self.slots[i].trace is not None:
                write_steps(self.slots[i].trace, self.rows.take_steps(self.slots[i].key))
        return logits


def _first_rank() -> bool:
    """Whether this worker is tensor-parallel rank 0 (a processor built outside vLLM's workers is)."""
    try:
        from vllm.distributed import parallel_state
        if not parallel_state.model_parallel_is_initialized():
            return True
        return parallel_state.get_tensor_model_parallel_rank() == 0
    except (ImportError, AssertionError, AttributeError):
        return True
