"""The typed view of a fusion's models: kinds declared once, members read by name, logits by kind."""

import pytest
import torch
from torch import nn

from logitfusion.engine.members import KINDS, Logits, Member, ModelSet, role_of
from logitfusion.engine.solvers import Alone, Delta, Dynamic


def model_set(experts=("math", "qa", "summ"), delta=True) -> ModelSet:
    m = lambda role: Member(role, nn.Linear(2, 2))  # noqa: E731
    return ModelSet(None, m("large"), m("small"), [m(role_of("expert", n)) for n in experts], 7,
                    m("delta") if delta else None)


def test_kinds_are_declared_once_in_the_engines_order():
    assert list(KINDS) == ["large", "small", "expert", "delta"]
    assert [k.name for k in KINDS.values() if k.small_side] == ["small", "expert"]
    assert role_of("expert", "math") == "expert:math" and role_of("large") == "large"
    with pytest.raises(ValueError, match="kind"):
        Member("critic", nn.Linear(2, 2))


def test_members_are_read_by_name():
    models = model_set()
    e = models.experts[1]
    assert e.kind is KINDS["expert"] and e.name == "qa" and models.large.name is None
    members = models.select(Dynamic().reads)
    assert members.large is models.large and members.small is models.small and members.delta is None
    assert [m.role for m in members] == ["large", "small", "expert:math", "expert:qa", "expert:summ"]
    alone = Alone("expert", 2)
    picked = models.select(alone.reads, alone.experts)
    assert picked.large is None and picked.experts == (models.experts[2],) and len(picked) == 1
    assert [m.role for m in models.select(Delta().reads)] == ["large", "delta"]
    assert model_set(delta=False).select(Delta().reads).lacking() is KINDS["delta"]


def test_subset_keeps_the_set_order_and_shares_stacks():
    models = model_set()
    sub = models.subset(["summ", "math"])
    assert sub.expert_names == ["math", "summ"] and sub.large is models.large and sub.stacks is models.stacks
    with pytest.raises(ValueError, match="no experts named"):
        models.subset(["code"])


def test_logits_by_kind_equal_the_ordered_list():
    gen = torch.Generator().manual_seed(0)
    models = model_set()
    members = models.select(Dynamic().reads)
    by_role = {m.role: torch.randn(3, 7, generator=gen) for m in members}
    z = members.logits(by_role)
    assert z.shape == (3, 7) and z.experts.shape == (3, 3, 7) and z.delta is None
    ordered = Logits.ordered(Dynamic().reads, list(by_role.values()))
    for f in ("large", "small", "experts"):
        assert torch.equal(getattr(z, f), getattr(ordered, f))
    solver = Dynamic()
    assert torch.equal(solver(z).logits, solver(ordered).logits)
    assert torch.equal(z.rows(slice(1, 3)).experts, z.experts[1:3])
