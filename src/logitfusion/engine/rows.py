"""The fusion step on rows whose large-model logits come from elsewhere.

Another backend runs the large model (a vLLM logits processor, or any loop of the caller's); it
hands, for the rows of its batch, their next-token logits and the tokens each row has produced
so far. `FusionRows` keeps the small side (small base, experts, delta: whatever the rows'
solvers read besides the large model) for those rows in an `HFRunner`, batched across rows,
catches every row up on the tokens it has not read yet, and returns the fused logits. Rows are
keyed by the caller's ids, and may be added, removed and reordered between steps; a row added
again with its prompt and output so far (a preempted request) is rebuilt from them. A row added
with `trace=True` records each step's StepTrace (weights, top tokens) by output position, for
`take_steps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch
from torch import Tensor

from .config import EngineConfig
from .decoding import StepTrace, encode_prompts, members_for, step_traces
from .errors import DecodingError
from .members import Member, Members, ModelSet
from .runner import HFRunner, Prefilled
from .solvers import Choice, Solver

MIN_ROOM = 16  # token room a new row's buffers get (they grow as it decodes)


@dataclass
class Row:
    prompt: list[int]  # the prompt in the large model's tokens
    solver: Solver
    members: Members  # the models its solver reads (the runner's, or some of them)
    read: int = 0  # output tokens the small side has read
    weights: list[list[float]] = field(default_factory=list)  # per step, each expert's weight
    trace: bool = False
    steps: dict[int, StepTrace] = field(default_factory=dict)  # when traced: output position -> its step


class FusionRows:
    """Fusion for rows whose large-model logits are handed in (method.md §2-4, one step at a time).

    rows = FusionRows(models, solver)
    rows.add("req-1", prompt_ids)
    fused = rows.apply(["req-1"], [output_ids], z_large)   # [B, V] -> [B, V]

    `models` needs the small side's members and the large model's tokenizer; the large member's
    weights are never run. Every row's solver must read members of `solver` (the runner's) and
    at least one besides the large model: static and dynamic on the same experts, or one expert alone.
    """

    def __init__(self, models: ModelSet, solver: Solver, engine: EngineConfig | None = None):
        engine = (engine or EngineConfig()).check()
        if engine.speculate > 1:
            raise DecodingError("speculative decoding runs in the engine's own loop; with the large model's logits "
                                "handed in, set speculate to 0", field="speculate")
        solver.check(len(models.experts))
        self.models, self.solver = models, solver
        self.members = members_for(models, solver)
        self.side = [m for m in self.members if m.kind.name != "large"]
        self.runner = HFRunner(models, self.side, engine.use_cache, engine.share_forwards) if self.side else None
        self.rows: dict[Hashable, Row] = {}
        self.order: list[Hashable] = []  # the runner's rows, in its order
        self.logits: dict[str, Tensor] = {}  # the small side's next-token logits, [len(order), V] per role
        self.joining: list[tuple[Hashable, Prefilled]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.rows

    # -- rows coming and going

    def add(self, key: Hashable, prompt_ids: Sequence[int], solver: Solver | None = None, trace: bool = False) -> None:
        """A new row: its prompt in the large model's token ids. Its small side is prefilled now and
        joins the others at the next `apply` (which also catches it up on any output it already has).
        trace: record each step's StepTrace (take_steps)."""
        if key in self.rows:
            raise DecodingError(f"row {key!r} is already running; remove it first", field="key")
        if not prompt_ids:
            raise DecodingError(f"row {key!r} has an empty prompt", field="prompt")
        solver = solver or self.solver
        members = members_for(self.models, solver)
        roles, side = {m.role for m in members}, {m.role for m in self.side}
        # A subset of the runner's models (one expert alone): the runner computes them anyway. One
        # that reads none of a runner's small side (the large model alone) has no use for its row.
        if not roles <= {m.role for m in self.members} or (side and not roles & side):
            raise DecodingError(f"method {solver.name!r} reads other models than this runner's {self.solver.name!r}",
                                field="solver")
        solver.check(len(self.models.experts))
        self.rows[key] = Row(list(prompt_ids), solver, members, trace=trace)
        if self.runner is not None:
            ids = {m.role: [self._prompt_of(m, list(prompt_ids))] for m in self.side}
            self.joining.append((key, self.runner.prefill(ids, MIN_ROOM)))

    def remove(self, key: Hashable) -> None:
        """The row leaves (finished, aborted or preempted); unknown keys are ignored."""
        if self.rows.pop(key, None) is None:
            return
        self.joining = [(k, p) for k, p in self.joining if k != key]
        if key in self.order:
            self._select([i for i, k in enumerate(self.order) if k != key])

    def weights(self, key: Hashable) -> list[list[float]]:
        """The row's per-step expert weights so far (empty for solvers without weights)."""
        return self.rows[key].weights

    def take_steps(self, key: Hashable) -> dict[int, StepTrace]:
        """A traced row's steps recorded since the last take, by output position (the token each
        step chose is output[position]); handed over, so a long row holds only its newest steps."""
        row = self.rows[key]
        steps, row.steps = row.steps, {}
        return steps

    # -- the step

    def apply(self, keys: Sequence[Hashable], tokens: Sequence[Sequence[int]], z_large: Tensor) -> Tensor:
        """Fused logits [B, V] for rows `keys`, whose large-model logits are z_large [B, V] and whose
        outputs so far are tokens[i] (large-model ids)."""
        unknown = [k for k in keys if k not in self.rows]
        if unknown:
            raise DecodingError(f"rows {unknown[:5]} were never added", field="key")
        if self.runner is not None:
            self._catch_up(keys, tokens)
        z = {"large": z_large}
        if self.runner is not None:
            position = {k: i for i, k in enumerate(self.order)}
            index = torch.tensor([position[k] for k in keys], device=z_large.device)
            z.update({role: t.to(z_large.device)[index] for role, t in self.logits.items()})
        return self._fuse(keys, z, [len(t) for t in tokens])

    def _fuse(self, keys: Sequence[Hashable], z: dict[str, Tensor], positions: Sequence[int]) -> Tensor:
        """Each row's solver on its rows (rows sharing a solver are solved together)."""
        out = torch.empty_like(z["large"], dtype=torch.float32)
        by_solver: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_solver.setdefault(id(self.rows[key].solver), []).append(i)
        for rows in by_solver.values():
            first = self.rows[keys[rows[0]]]
            index = torch.tensor(rows, device=out.device)
            group = {r: t[index] for r, t in z.items()}
            choice: Choice = first.solver(first.members.logits(group))
            out[index] = choice.logits.float()
            if choice.weights is not None:
                for i, w in zip(rows, choice.weights.double().round(decimals=6).tolist()):
                    self.rows[keys[i]].weights.append(w)
            if any(self.rows[keys[i]].trace for i in rows):
                # By position, so that a step run again for the same token (a step whose token
                # vLLM discarded) replaces the first instead of adding one.
                for i, step in zip(rows, step_traces(first.members, group, choice)):
                    if self.rows[keys[i]].trace:
                        self.rows[keys[i]].steps[positions[i]] = step
        return out

    def _catch_up(self, keys: Sequence[Hashable], tokens: Sequence[Sequence[int]]) -> None:
        """Every running row reads its new output: one token each as one batched step (rows with
        none hold); a row behind by more (added with output, or resumed) is prefilled again."""
        new = {k: list(t[self.rows[k].read:]) for k, t in zip(keys, tokens)}
        behind = [k for k in self.order if len(new.get(k, ())) > 1]
        joined = {k for k, _ in self.joining}
        behind += [k for k in keys if k in joined and new[k]]
        for key in behind:  # rebuilt from prompt + output
            self._rebuild(key, list(tokens[keys.index(key)]))
        stepping = [i for i, k in enumerate(self.order) if len(new.get(k, ())) == 1]
        if stepping:
            step = torch.full((len(self.order),), self.runner.pad_id, dtype=torch.long)
            for i in stepping:
                step[i] = new[self.order[i]][0]
                self.rows[self.order[i]].read += 1
            logits = self.runner.step(step)
            moving = set(stepping)
            self.runner.hold([i for i in range(len(self.order)) if i not in moving])
            mask = torch.zeros(len(self.order), dtype=torch.bool)
            mask[stepping] = True
            for role, z in logits.items():
                self.logits[role] = torch.where(mask.to(z.device)[:, None], z, self.logits[role])
        for key, prefilled in self.joining:
            for role, z in self.runner.join(prefilled).items():
                self.logits[role] = torch.cat([self.logits[role], z]) if role in self.logits else z
            self.order.append(key)
        self.joining = []

    def _rebuild(self, key: Hashable, output: list[int]) -> None:
        row = self.rows[key]
        if key in self.order:
            self._select([i for i, k in enumerate(self.order) if k != key])
        self.joining = [(k, p) for k, p in self.joining if k != key]
        ids = {m.role: [self._prompt_of(m, row.prompt) + self._output_of(m, output)] for m in self.side}
        self.joining.append((key, self.runner.prefill(ids, MIN_ROOM)))
        row.read = len(output)

    def _select(self, keep: list[int]) -> None:
        self.order = [self.order[i] for i in keep]
        rows = torch.tensor(keep, dtype=torch.long)
        self.runner.select(rows)
        self.logits = {role: z[rows.to(z.device)] for role, z in self.logits.items()} if keep else {}

    # -- prompts in each member's tokens

    def _prompt_of(self, member: Member, prompt: list[int]) -> list[int]:
        """A member's prompt: the large model's ids where the member reads them as they are (same
        tokenizer, no template of its own), else the prompt's text templated and tokenised anew."""
        if member.template == "{prompt}" and not member.foreign:
            return prompt
        text = self.models.tokenizer.decode(prompt, skip_special_tokens=True)
        return encode_prompts(self.models, member, [text])[0]

    def _output_of(self, member: Member, output: list[int]) -> list[int]:
        if not member.foreign:
            return output
        text = self.models.tokenizer.decode(output)
        return member.tokenizer(text, add_special_tokens=False)["input_ids"]
