"""Evaluation through lm-evaluation-harness: a fused model is just another lm-eval `--model`.

- `FusedLM`: the lm-eval `LM` registered as "logitfusion". generate_until runs the one decoding
  loop (`Fuser.generate`); loglikelihood and loglikelihood_rolling run the engine's teacher-forced scoring
  (`engine.scoring.fused_logprobs`).
- `task_manager`: lm-eval's TaskManager with the tasks shipped in `logitfusion/eval/tasks`.
- `main`: `python -m logitfusion.eval.lm ...` is the `lm_eval` CLI with the `logitfusion`
  model and our tasks registered (lm-eval 0.4 has no plugin discovery of its own).
- `run_task`, `summarise` (in matrix.py): what `logitfusion eval` runs and prints (methods x tasks).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.models.utils import Collator, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised by the CLI test with lm-eval hidden
    raise ImportError("logitfusion's evaluation needs lm-evaluation-harness: pip install lm-eval") from e

from ..engine.compat import lm_eval_cli_task_paths
from ..engine.decoding import members_for, render
from ..engine.fuser import Fuser
from ..engine.members import ModelSet
from ..engine.recipe import Recipe
from ..engine.registry import SearchConfig
from ..engine.sampling import SamplingParams
from ..engine.scoring import fused_logprobs, prefix_token_id
from ..engine.solvers import Solver
from ..vllm.backend import load

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
MODEL_NAME = "logitfusion"


class EvalError(ValueError):
    """Bad evaluation input (unknown task, missing data, impossible request...)."""


# ---------------------------------------------------------------- the lm-eval model

def _names(value) -> list[str] | None:
    """experts=math+qa (CLI-friendly), a list, or None."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else [str(v) for v in value]
    return [v for v in str(value).replace(";", "+").replace(",", "+").split("+") if v]


def _floats(value) -> list[float] | None:
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else [float(v) for v in value]
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in str(value).replace(";", "+").replace(",", "+").split("+") if v]


class FusedLM(LM):
    """A fusion recipe as an lm-eval model (`--model logitfusion`).

    model_args (all optional but `recipe`):
      recipe       the fusion recipe file (models, templates, solver defaults)
      solver       large | expert[:NAME] | static[:A] | dynamic | dynamic:fast | dynamic:joint
                   (default: the recipe's solver)
      weights      static weights, one per expert or one for all: 0.5+1.0 (or a list)
      grid         dynamic grid: start:stop:step (0:2:0.1) or a list [0,0.5,1]
      strategy     several experts: fast | joint;  a_max: box of the joint solver
      experts      load only these experts: math+qa (or a list)
      ceiling      true: evaluate the recipe's `ceiling` (a fine-tuned large model) alone
      batch_size   requests per batch (default 8; "auto" is taken as 8)
      max_gen_toks default generation length when a task sets none (default 256)
      max_length   cap on the context of rolling windows (default: the models' context)
      seed         sampling seed for tasks that sample (default 1234)
      device, dtype, trust_remote_code   override the recipe's `load` section
    """

    def __init__(self, recipe: str | Path | Recipe | None = None, solver: str | None = None, weights=None,
                 grid=None, strategy: str | None = None, a_max: float | None = None, experts=None,
                 search: SearchConfig | None = None,
                 ceiling: bool = False, batch_size: int | str = 8, max_gen_toks: int = 256,
                 max_length: int | None = None, seed: int = 1234, device: str | None = None,
                 dtype: str | None = None, trust_remote_code: bool = False, max_batch_size=None,
                 fuser: Fuser | None = None, **unknown):
        super().__init__()
        if unknown:
            raise EvalError(f"unknown model_args for logitfusion: {sorted(unknown)}; accepted: recipe, solver, "
                            "weights, grid, strategy, a_max, experts, ceiling, batch_size, max_gen_toks, "
                            "max_length, seed, device, dtype, trust_remote_code")
        if fuser is None:
            if recipe is None:
                raise EvalError("model_args need recipe=PATH (a fusion recipe file)")
            # Fuser, or VLLMFuser for `backend: {kind: vllm}` (generation only)
            fuser = load(_recipe_for(recipe, experts, ceiling, device, dtype, trust_remote_code))
        self.fuser = fuser
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length) if max_length else None
        self.seed = int(seed)
        # model_args (text from lm-eval's command line) over a SearchConfig given in Python
        self.search = SearchConfig.parse(grid, strategy, a_max).over(search or SearchConfig())
        self.static_weights = _floats(weights)
        self.solver = fuser.solver
        if ceiling:
            self.set_method("large")
        elif solver is not None or self.static_weights is not None or self.search != SearchConfig():
            self.set_method(solver or self._recipe_spec())
        self._warned_truncation = False
        self._next_seed = self.seed

    # -- switching methods without reloading

    def set_method(self, spec: str) -> Solver:
        """Switch the solver (models stay loaded): large, expert:NAME, static:1.0, dynamic:joint..."""
        spec = spec.strip()
        if spec == "static" and self.static_weights:
            spec = "static:" + ",".join(str(w) for w in self.static_weights)
        self.solver = self.fuser.method(spec, self.search)
        return self.solver

    def _recipe_spec(self) -> str:
        """The recipe's solver as a method spec (so that grid=... or weights=... apply to it)."""
        recipe = self.fuser.recipe
        if recipe.solver.kind == "static" and self.static_weights:
            return "static"  # set_method spells out weights=...
        return recipe.method_spec()

    @property
    def models(self) -> ModelSet:
        return self.fuser.models

    @property
    def tokenizer(self):
        return self.models.tokenizer

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "logitfusion")).replace("/", "__")

    @property
    def max_length(self) -> int:
        """Positions every model the solver reads can take (rolling windows use this)."""
        contexts = [m.context for m in members_for(self.models, self.solver) if m.context]
        longest = min(contexts) if contexts else 2048
        return min(longest, self._max_length) if self._max_length else longest

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    # -- loglikelihood

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        contexts, continuations = [], []
        for context, continuation in (r.args for r in requests):
            ctx, cont = self._encode_pair(context, continuation)
            contexts.append(ctx)
            continuations.append(cont)
        return self._loglikelihood(contexts, continuations)

    def _encode_pair(self, context: str, continuation: str) -> tuple[str | list[int], list[int]]:
        """As lm-eval's hf backend: trailing spaces of the context move to the continuation, and
        the continuation's tokens are those of context + continuation after the context's."""
        if not context:
            cont = self.encode(continuation, add_special_tokens=False)
            prefix = prefix_token_id(self.tokenizer)
            # An empty context is conditioned on BOS (EOS): "" renders each template with an
            # empty prompt, and an empty result becomes [BOS] (see context_ids).
            return ("", cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return context, whole[len(ctx):]

    def _loglikelihood(self, contexts, continuations) -> list[tuple[float, bool]]:
        """Requests that share their context and all but the last continuation token (the choices
        of most multiple-choice tasks) are scored once; groups go longest first, as in lm-eval's
        hf backend."""
        groups: dict[tuple, list[int]] = {}
        for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
            if cont:
                key = (ctx if isinstance(ctx, str) else tuple(ctx), tuple(cont[:-1]))
                groups.setdefault(key, []).append(i)
        by_head = {same[0]: same for same in groups.values()}
        heads = list(by_head)
        results: list[tuple[float, bool]] = [(0.0, True)] * len(contexts)  # empty continuation: log 1
        if not isinstance(self.fuser, Fuser):
            raise EvalError("loglikelihood tasks (multiple choice, perplexity) score the prompt's tokens, which vLLM's "
                            "logits processor never sees: with `backend: {kind: vllm}` run generation tasks, or "
                            "use backend.kind hf for these")
        sorter = Collator(heads, sort_fn=lambda i: (-len(continuations[i]) - len(str(contexts[i])), i))
        for chunk in sorter.get_batched(n=self.batch_size):
            scored = fused_logprobs(self.models, self.solver, [contexts[i] for i in chunk],
                                    [continuations[i] for i in chunk], batch_size=len(chunk))
            for head, s in zip(chunk, scored):
                for i in by_head[head]:
                    results[i] = s.with_last(continuations[i][-1])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of `max_length` tokens (as lm-eval's hf
        backend). Every model reads the same tokens: prompt templates do not apply here."""
        windows, owner = [], []
        for n, (text,) in enumerate(r.args for r in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.encode(text), prefix_token=prefix_token_id(self.tokenizer),
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        scored = self._loglikelihood([w[0] for w in windows], [w[1] for w in windows])
        for n, (lp, _) in zip(owner, scored):
            totals[n] += lp
        return totals

    # -- generation: the engine's one decoding loop

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of equal generation settings, longest prompts first, decoded by Fuser.generate
        (stop strings, max tokens, greedy or seeded sampling)."""
        sorter = Collator([r.args for r in requests], sort_fn=lambda a: (-len(a[0]), a[0]),
                          group_by="gen_kwargs", group_fn=lambda a: a[1])
        out = []
        for chunk in sorter.get_batched(n=self.batch_size):
            prompts, all_kwargs = zip(*chunk)
            kwargs = dict(normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks))
            stop = [s for s in kwargs.pop("until", []) or [] if s]
            max_new = int(kwargs.pop("max_gen_toks"))
            gens = self.fuser.generate([self._fit_prompt(p, max_new) for p in prompts], solver=self.solver,
                                       max_new_tokens=max_new, stop=stop, batch_size=len(prompts),
                                       seed=[self._next_seed + k for k in range(len(prompts))],
                                       **_sampling_options(kwargs))
            self._next_seed += len(prompts)  # repeated requests (e.g. self-consistency) sample anew
            for g in gens:
                if g.error:
                    log.warning("generation stopped early: %s", g.error)
            out += [g.text for g in gens]
        return sorter.get_original(out)

    def _fit_prompt(self, prompt: str, max_new: int) -> str:
        """Drop tokens from the prompt's start until every model's templated prompt leaves room
        for max_new tokens (lm-eval's hf backend left-truncates the same way). With vLLM, vLLM checks."""
        if not isinstance(self.fuser, Fuser):
            return prompt
        members = [m for m in members_for(self.models, self.solver) if m.context]
        for _ in range(4):
            over = max([len(self.encode(render(m.template, prompt))) - max(m.context - max_new, m.context // 2)
                        for m in members] or [0])
            if over <= 0:
                return prompt
            if not self._warned_truncation:
                log.warning("a prompt is longer than the models' context allows; its start is cut off")
                self._warned_truncation = True
            prompt = self.tokenizer.decode(self.encode(prompt, add_special_tokens=False)[over:])
        return prompt

    def get_model_info(self) -> dict:
        return {"logitfusion_solver": type(self.solver).__name__.lower(),
                "logitfusion_experts": self.fuser.expert_names}


def _sampling_options(gen_kwargs: dict) -> dict:
    """A task's gen_kwargs as Fuser.generate's sampling options: greedy, with every filter off
    (SamplingParams' defaults), unless the task samples at a temperature above 0."""
    off = SamplingParams()
    temperature = float(gen_kwargs.get("temperature", off.temperature))
    if not (gen_kwargs.get("do_sample") and temperature > 0):
        return dict(temperature=off.temperature, top_k=off.top_k, top_p=off.top_p)
    return dict(temperature=temperature, top_k=int(gen_kwargs.get("top_k") or off.top_k),
                top_p=float(gen_kwargs.get("top_p") or off.top_p))


def _batch_size(value) -> int:
    if isinstance(value, str) and not value.strip().isdigit():
        if value.startswith("auto"):
            log.info("batch_size=%s: automatic batch sizes are not supported; using 8", value)
            return 8
        raise EvalError(f"batch_size must be a positive integer, got {value!r}")
    size = int(value)
    if size < 1:
        raise EvalError(f"batch_size must be >= 1, got {size}")
    return size


def _recipe_for(recipe, experts=None, ceiling: bool = False, device: str | None = None, dtype: str | None = None,
                trust_remote_code: bool = False) -> Recipe:
    """The recipe with model_args applied: an expert subset, the ceiling alone, load overrides."""
    r = recipe if isinstance(recipe, Recipe) else Recipe.from_file(recipe)
    fields, solver = {}, {}
    wanted = _names(experts)
    if wanted is not None:
        known = [e.name for e in r.experts]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise EvalError(f"experts {unknown} are not in the recipe; its experts: {known}")
        keep = [i for i, name in enumerate(known) if name in wanted]
        fields["experts"] = [r.experts[i].model_dump() for i in keep]
        weights = getattr(r.solver, "weights", [])
        if len(weights) == len(known) > 1:  # static weights: one per expert
            solver["weights"] = [weights[i] for i in keep]
        if r.solver.kind == "expert" and r.solver.expert not in wanted:
            solver["expert"] = wanted[0]
    if ceiling:
        if r.ceiling is None:
            raise EvalError("ceiling=true needs a recipe with `ceiling: {path: ...}` (a fine-tuned large model)")
        fields |= {"large": r.ceiling.model_dump(), "small": None, "experts": [], "ceiling": None}
        solver = {"kind": "large"}
    load = {"dtype": dtype or None, "trust_remote_code": bool(trust_remote_code) or None}  # None keeps the recipe's
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device=%s is not available here; using the recipe's device %s", device, r.load.device)
        elif r.load.device_map is None:
            load["device"] = device
    return r.with_overrides(load=load, solver=solver, **fields)


# ---------------------------------------------------------------- registration and tasks

def register() -> None:
    """Register `logitfusion` (lazily, by import path) in lm-eval's model registry. Idempotent."""
    import lm_eval.models  # noqa: F401 - fills the registry with lm-eval's own models first
    from lm_eval.api.registry import model_registry
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=f"{__name__.replace('__main__', 'logitfusion.eval.lm')}:FusedLM")


def register_plugins() -> list[str]:
    """Register every model that installed packages declare under the `lm_eval.models` entry point
    group (ours included). lm-eval 0.4 does not read that group itself; this wrapper does."""
    from importlib.metadata import entry_points

    from lm_eval.api.registry import model_registry
    register()
    added = []
    for ep in entry_points(group="lm_eval.models"):
        if ep.name not in model_registry:
            model_registry.register(ep.name, target=ep.value)
            added.append(ep.name)
    return added


def task_paths(include_path: str | Path | Sequence[str | Path] | None = None) -> list[Path]:
    """Our tasks folder, then the caller's (a list, or one string with os.pathsep-separated paths)."""
    extra: list[str | Path] = []
    if isinstance(include_path, (str, Path)):
        extra = [p for p in str(include_path).split(os.pathsep) if p]
    elif include_path:
        extra = list(include_path)
    for p in extra:
        if not Path(p).is_dir():
            raise EvalError(f"task folder {str(p)!r} does not exist")
    return [TASKS_DIR, *(Path(p) for p in extra)]


def task_manager(tasks: Sequence[str] = (), include_path=None, metadata: dict | None = None):
    """lm-eval's TaskManager with our tasks. Indexing lm-eval's ~15k built-in tasks takes seconds,
    so they are left out when every requested task is ours (or a YAML file)."""
    from lm_eval.tasks import TaskManager
    paths = task_paths(include_path)
    if tasks:
        own = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
        if all(t in own.all_tasks or t.endswith(".yaml") for t in tasks):
            return own
    return TaskManager(include_path=paths, metadata=metadata)


def check_tasks(manager, tasks: Sequence[str]) -> None:
    """Unknown task names (and missing YAML files) -> EvalError with close matches."""
    import difflib
    for t in tasks:
        if t.endswith(".yaml"):
            if not Path(t).is_file():
                raise EvalError(f"task file {t!r} does not exist")
        elif t not in manager.all_tasks:
            close = difflib.get_close_matches(t, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise EvalError(f"unknown task {t!r}{hint} (list them with `python -m logitfusion.eval.lm ls tasks`)")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m logitfusion.eval.lm ARGS`: exactly the `lm_eval` CLI (same arguments), with
    `--model logitfusion` and the tasks of logitfusion/eval/tasks available."""
    register_plugins()
    lm_eval_cli_task_paths(task_paths)
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


register()

if __name__ == "__main__":
    main()
