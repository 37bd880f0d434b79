"""Weight solvers against brute force (plain loops over candidates, one `objective` call each)."""

import itertools
import math

import pytest
import torch

from logitfusion.engine.members import Logits

from logitfusion.engine.fusion import fuse, objective
from logitfusion.engine.registry import SearchConfig, parse_method
from logitfusion.engine.fusion import grid_search
from logitfusion.engine.solvers import Alone, Choice, Dynamic, SolverError, Static, check_grid, make_grid, parse_grid

GRID = make_grid(0.0, 2.0, 0.1)


def setting(B=6, T=1, V=40, seed=0):
    """Logits where fine-tuning moved the small model a fair amount (non-trivial optimum)."""
    g = torch.Generator().manual_seed(seed)
    z_l = torch.randn(B, V, generator=g) * 3
    z_s = torch.randn(B, V, generator=g) * 3
    z_e = z_s[:, None] + torch.randn(B, T, V, generator=g) * 1.5
    return z_l, z_s, z_e


def j_of(z_l, z_s, z_e, b, a):
    """J of one sequence b at one weight vector a (a plain list)."""
    return objective(z_l[b:b + 1], z_s[b:b + 1], z_e[b:b + 1], torch.tensor([a], dtype=torch.float32))[0, 0].item()


def brute_force(z_l, z_s, z_e, candidates):
    """Per sequence: (min J, list of candidates attaining it), one objective call per candidate."""
    out = []
    for b in range(z_l.shape[0]):
        js = [(j_of(z_l, z_s, z_e, b, list(a)), list(a)) for a in candidates]
        best = min(j for j, _ in js)
        out.append((best, [a for j, a in js if j <= best * (1 + 1e-6) + 1e-9]))
    return out


def one_nonzero(grid, T):
    return [[a if t == s else 0.0 for t in range(T)] for s in range(T) for a in grid]


def assert_attains_minimum(solver, z_l, z_s, z_e, candidates):
    weights, j = solver.solve(z_l, z_s, z_e)
    assert weights.shape == (z_l.shape[0], z_e.shape[1]) and j.shape == (z_l.shape[0],)
    for b, (best, argmins) in enumerate(brute_force(z_l, z_s, z_e, candidates)):
        w = [round(x, 6) for x in weights[b].tolist()]
        assert any(w == pytest.approx(a, abs=1e-6) for a in argmins), (b, w, argmins)
        assert j[b].item() == pytest.approx(best, rel=1e-4, abs=1e-7)
        assert j_of(z_l, z_s, z_e, b, weights[b].tolist()) == pytest.approx(best, rel=1e-4, abs=1e-7)
    return weights, j


# ------------------------------------------------------------------ dynamic: attains the grid minimum

def test_dynamic_one_expert_attains_grid_minimum():
    z_l, z_s, z_e = setting(B=8, T=1, seed=1)
    weights, _ = assert_attains_minimum(Dynamic(), z_l, z_s, z_e, [[a] for a in GRID])
    # a meaningful check: the optimum is not the same for every sequence, nor always 0
    assert len({round(w, 6) for w in weights[:, 0].tolist()}) > 1


def test_dynamic_fast_three_experts_attains_one_nonzero_minimum():
    z_l, z_s, z_e = setting(B=6, T=3, seed=2)
    weights, _ = assert_attains_minimum(Dynamic(strategy="fast"), z_l, z_s, z_e, one_nonzero(GRID, 3))
    assert ((weights != 0).sum(-1) <= 1).all()  # only one a_t is non-zero per step
    assert len({int(w.argmax()) for w in weights if w.any()}) > 1  # different experts get picked


def test_dynamic_joint_product_grid_attains_product_minimum():
    grid = make_grid(0.0, 2.0, 0.25)  # 9 values, 81 products <= max_product
    z_l, z_s, z_e = setting(B=6, T=2, seed=3)
    solver = Dynamic(grid, strategy="joint")
    assert len(grid) ** 2 <= solver.max_product
    weights, _ = assert_attains_minimum(solver, z_l, z_s, z_e, [list(a) for a in itertools.product(grid, repeat=2)])
    assert ((weights != 0).sum(-1) == 2).any()  # the joint optimum uses both experts somewhere


def test_dynamic_custom_and_unsorted_grid():
    grid = [1.5, 0.0, 0.3, 0.9]
    z_l, z_s, z_e = setting(B=6, T=1, seed=4)
    weights, _ = assert_attains_minimum(Dynamic(grid), z_l, z_s, z_e, [[a] for a in grid])
    assert set(round(w, 6) for w in weights[:, 0].tolist()) <= set(grid)


def test_dynamic_ties_go_to_the_smallest_weight():
    """An expert identical to the small base moves nothing: every a gives the same J, pick a = 0."""
    z_l, z_s, _ = setting(B=3, T=1, seed=5)
    weights, j = Dynamic([2.0, 1.0, 0.0, 0.5]).solve(z_l, z_s, z_s[:, None].clone())
    assert weights.tolist() == [[0.0]] * 3
    torch.testing.assert_close(j, torch.zeros(3), atol=1e-9, rtol=0)


def test_dynamic_keeps_no_state_between_steps():
    """The running minimum is reset every step (method.md §3): a reused solver equals a fresh one."""
    solver = Dynamic()
    a = setting(B=4, T=1, seed=6)
    b = setting(B=4, T=1, seed=7)
    solver.solve(*a)
    w_reused, j_reused = solver.solve(*b)
    w_fresh, j_fresh = Dynamic().solve(*b)
    torch.testing.assert_close(w_reused, w_fresh)
    torch.testing.assert_close(j_reused, j_fresh)


# ------------------------------------------------------------------ joint vs fast

def test_joint_product_grid_never_worse_than_fast():
    grid = make_grid(0.0, 2.0, 0.25)
    z_l, z_s, z_e = setting(B=16, T=2, seed=8)
    _, j_fast = Dynamic(grid, strategy="fast").solve(z_l, z_s, z_e)
    w_joint, j_joint = Dynamic(grid, strategy="joint").solve(z_l, z_s, z_e)
    assert (j_joint <= j_fast + 1e-6).all()
    assert (j_joint < j_fast - 1e-6).any()  # and strictly better somewhere
    assert (w_joint >= 0).all() and (w_joint <= 2.0).all()


def test_joint_continuous_refine_never_worse_than_fast_and_stays_in_box():
    T = 4
    z_l, z_s, z_e = setting(B=8, T=T, seed=9)
    joint = Dynamic(strategy="joint")  # default 21-point grid: 21**4 > 4096 -> continuous refine
    assert len(joint.grid) ** T > joint.max_product
    _, j_fast = Dynamic(strategy="fast").solve(z_l, z_s, z_e)
    w_joint, j_joint = joint.solve(z_l, z_s, z_e)
    assert (j_joint <= j_fast + 1e-6).all()
    assert (j_joint < j_fast - 1e-6).any()
    assert (w_joint >= 0).all() and (w_joint <= joint.a_max).all()
    # the reported J is the J of the returned weights
    for b in range(z_l.shape[0]):
        assert j_joint[b].item() == pytest.approx(j_of(z_l, z_s, z_e, b, w_joint[b].tolist()), rel=1e-4, abs=1e-7)


def test_joint_refine_respects_explicit_a_max():
    z_l, z_s, z_e = setting(B=8, T=4, seed=10)
    solver = Dynamic(make_grid(0, 1, 0.1), strategy="joint", a_max=1.25, max_product=100)
    w, j = solver.solve(z_l, z_s, z_e)
    assert (w >= 0).all() and (w <= 1.25 + 1e-6).all()
    _, j_fast = Dynamic(make_grid(0, 1, 0.1), strategy="fast").solve(z_l, z_s, z_e)
    assert (j <= j_fast + 1e-6).all()


def test_joint_product_grid_without_zero_never_worse_than_fast():
    grid = [0.5, 1.0, 1.5, 2.0]
    z_l, z_s, z_e = setting(B=16, T=2, seed=11)
    _, j_fast = Dynamic(grid, strategy="fast").solve(z_l, z_s, z_e)
    _, j_joint = Dynamic(grid, strategy="joint").solve(z_l, z_s, z_e)
    assert (j_joint <= j_fast + 1e-6).all(), (j_joint - j_fast).tolist()


# ------------------------------------------------------------------ batch independence, chunking

@pytest.mark.parametrize("solver,T", [
    (Dynamic(), 1),
    (Dynamic(strategy="fast"), 3),
    (Dynamic(make_grid(0, 2, 0.25), strategy="joint"), 2),
    (Dynamic(strategy="joint"), 4),  # continuous refine
])
def test_solving_a_batch_equals_solving_each_row(solver, T):
    z_l, z_s, z_e = setting(B=5, T=T, seed=12)
    w, j = solver.solve(z_l, z_s, z_e)
    for b in range(5):
        wb, jb = solver.solve(z_l[b:b + 1], z_s[b:b + 1], z_e[b:b + 1])
        torch.testing.assert_close(w[b:b + 1], wb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(j[b:b + 1], jb, atol=1e-6, rtol=1e-4)


def test_grid_search_in_chunks_equals_one_chunk():
    z_l, z_s, z_e = setting(B=4, T=2, seed=13)
    cands = torch.tensor([list(a) for a in itertools.product(make_grid(0, 2, 0.25), repeat=2)])
    w1, j1 = grid_search(z_l, z_s, z_e, cands)
    # chunk = max_elements // (B * V) = 3 candidates per chunk: 27 chunks
    w2, j2 = grid_search(z_l, z_s, z_e, cands, max_elements=3 * 4 * z_l.shape[1])
    torch.testing.assert_close(w1, w2)
    torch.testing.assert_close(j1, j2)
    # ties across chunks still go to the earliest candidate (all-zero weights first)
    w3, _ = grid_search(z_l, z_s, z_s[:, None].expand(-1, 2, -1).clone(), cands,
                        max_elements=3 * 4 * z_l.shape[1])
    assert w3.tolist() == [[0.0, 0.0]] * 4


# ------------------------------------------------------------------ choices

def test_dynamic_choice_logits_are_fused_at_the_chosen_weights():
    z_l, z_s, z_e = setting(B=4, T=3, seed=14)
    choice = Dynamic()(Logits.of(large=z_l, small=z_s, experts=z_e))
    assert isinstance(choice, Choice)
    torch.testing.assert_close(choice.logits, fuse(z_l, z_s, z_e, choice.weights))
    torch.testing.assert_close(choice.objective, Dynamic().solve(z_l, z_s, z_e)[1])


@pytest.mark.parametrize("weights", [[1.0], [0.5, 1.0, 1.5], [0.0]])
def test_static_choice_equals_fuse(weights):
    z_l, z_s, z_e = setting(B=3, T=3, seed=15)
    choice = Static(weights)(Logits.of(large=z_l, small=z_s, experts=z_e))
    w = torch.tensor(weights).expand(3)
    torch.testing.assert_close(choice.logits, fuse(z_l, z_s, z_e, w))
    assert choice.weights.shape == (3, 3)
    torch.testing.assert_close(choice.weights, w.expand(3, 3))
    assert choice.objective is None
    if weights == [0.0]:
        torch.testing.assert_close(choice.logits, z_l)


def test_static_check_errors():
    with pytest.raises(SolverError, match="3 experts"):
        Static([1.0, 0.5]).check(3)
    with pytest.raises(SolverError, match="at least one expert"):
        Static([1.0]).check(0)
    with pytest.raises(SolverError, match="finite"):
        Static([float("nan")]).check(1)
    Static([1.0]).check(4)  # one weight for all experts
    Static([1.0, 2.0]).check(2)


def test_dynamic_check_needs_an_expert():
    with pytest.raises(SolverError, match="at least one expert"):
        Dynamic().check(0)
    Dynamic().check(1)


def test_alone_returns_the_right_member_logits():
    z_l, z_s, z_e = setting(B=2, T=3, seed=16)
    large = Alone("large")
    assert large.reads == {"large"} and large.experts == ()
    torch.testing.assert_close(large(Logits.of(large=z_l)).logits, z_l)
    expert = Alone("expert", 2)
    assert expert.reads == {"expert"} and expert.experts == (2,)
    # the decoding loop passes only the experts the solver declares: [B, 1, V]
    torch.testing.assert_close(expert(Logits.of(experts=z_e[:, 2:3])).logits, z_e[:, 2])
    assert large(Logits.of(large=z_l)).weights is None
    with pytest.raises(SolverError, match="out of range"):
        Alone("expert", 3).check(3)
    with pytest.raises(SolverError):
        Alone("small")


# ------------------------------------------------------------------ grids

def test_make_grid_default_paper_grid():
    g = make_grid(0, 2, 0.1)
    assert len(g) == 21
    assert g[0] == 0.0 and g[-1] == 2.0
    assert 0.3 in g and g[3] == 0.3  # not 0.30000000000000004
    assert 0.7 in g and 1.1 in g
    assert g == sorted(g)


@pytest.mark.parametrize("args,want", [
    ((0, 1, 0.25), [0.0, 0.25, 0.5, 0.75, 1.0]),
    ((0, 0.3, 0.1), [0.0, 0.1, 0.2, 0.3]),
    ((0.5, 2, 0.5), [0.5, 1.0, 1.5, 2.0]),
    ((0, 1, 0.3), [0.0, 0.3, 0.6, 0.9]),
    ((1, 1, 0.1), [1.0]),
])
def test_make_grid_values(args, want):
    assert make_grid(*args) == want


@pytest.mark.parametrize("args,msg", [((0, 2, 0), "step"), ((0, 2, -0.1), "step"), ((2, 0, 0.1), "below")])
def test_make_grid_errors(args, msg):
    with pytest.raises(SolverError, match=msg):
        make_grid(*args)


@pytest.mark.parametrize("grid,a_max,msg", [
    ([], 2.0, "empty"),
    ([0.0, -0.1, 1.0], 2.0, "-0.1"),
    ([0.0, 2.5], 2.0, "2.5"),
    ([0.0, float("nan")], 2.0, "nan"),
    ([0.0, float("inf")], 2.0, "inf"),
])
def test_check_grid_errors(grid, a_max, msg):
    with pytest.raises(SolverError, match=msg):
        check_grid(grid, a_max)


def test_check_grid_accepts_valid_grids():
    check_grid([0.0, 1.0, 2.0], 2.0)
    check_grid([0.5], 0.5)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(grid=[]), "empty"),
    (dict(grid=[-1.0, 0.0]), "outside"),
    (dict(grid=[0.0, 3.0], a_max=2.0), "outside"),
    (dict(grid=[0.0, float("nan")]), "outside"),
    (dict(strategy="slow"), "strategy"),
])
def test_dynamic_rejects_bad_parameters(kwargs, msg):
    with pytest.raises(SolverError, match=msg):
        Dynamic(**kwargs)


def test_dynamic_a_max_defaults_to_grid_max():
    assert Dynamic(make_grid(0, 1.5, 0.5)).a_max == 1.5
    assert Dynamic(make_grid(0, 1, 0.5), a_max=3.0).a_max == 3.0


@pytest.mark.parametrize("text,want", [
    ("0:2:0.1", make_grid(0, 2, 0.1)),
    ("0:1:0.5", [0.0, 0.5, 1.0]),
    ("0,0.5,1", [0.0, 0.5, 1.0]),
    ("1.5", [1.5]),
    ("0, 0.25 ,1,", [0.0, 0.25, 1.0]),
])
def test_parse_grid(text, want):
    assert parse_grid(text) == want


@pytest.mark.parametrize("text", ["0:2", "a,b", "0:2:x", "0:2:0", "2:0:0.1", "0:1:0.1:5"])
def test_parse_grid_errors(text):
    with pytest.raises(SolverError, match="grid"):
        parse_grid(text)


NAMES = ["math", "qa", "code"]


def test_parse_method_all_specs():
    s = parse_method("large", NAMES)
    assert isinstance(s, Alone) and s.member == "large"
    s = parse_method("expert", NAMES)
    assert isinstance(s, Alone) and s.member == "expert" and s.expert == 0
    s = parse_method("expert:code", NAMES)
    assert isinstance(s, Alone) and s.expert == 2 and s.experts == (2,)
    s = parse_method("static", NAMES)
    assert isinstance(s, Static) and list(s.weights) == [1.0]
    s = parse_method("static:0.5", NAMES)
    assert list(s.weights) == [0.5]
    s = parse_method("static:0.5,1.0,1.5", NAMES)
    assert list(s.weights) == [0.5, 1.0, 1.5]
    s = parse_method("dynamic", NAMES)
    assert isinstance(s, Dynamic) and s.strategy == "fast" and s.grid == GRID
    assert parse_method("dynamic:fast", NAMES).strategy == "fast"
    assert parse_method("dynamic:joint", NAMES).strategy == "joint"
    assert parse_method("  large ", NAMES).member == "large"


def test_parse_method_passes_grid_strategy_and_a_max():
    s = parse_method("dynamic", NAMES, SearchConfig(grid=[0.0, 0.5], strategy="joint", a_max=1.0))
    assert s.grid == [0.0, 0.5] and s.strategy == "joint" and s.a_max == 1.0
    # an explicit strategy in the spec wins over the default argument
    assert parse_method("dynamic:fast", NAMES, SearchConfig(strategy="joint")).strategy == "fast"


@pytest.mark.parametrize("spec,names,msg", [
    ("expert:nope", NAMES, "nope"),
    ("expert", [], "at least one expert"),
    ("static:abc", NAMES, "bad weights"),
    ("static:1,2", NAMES, "2 weights for 3 experts"),
    ("static", [], "at least one expert"),
    ("dynamic", [], "at least one expert"),
    ("dynamic:slow", NAMES, "strategy"),
    ("large:x", NAMES, "unknown method"),
    ("magic", NAMES, "unknown method"),
    ("", NAMES, "unknown method"),
])
def test_parse_method_errors(spec, names, msg):
    with pytest.raises(SolverError, match=msg):
        parse_method(spec, names)


def test_parse_method_rejects_bad_grid():
    with pytest.raises(SolverError, match="outside"):
        parse_method("dynamic", NAMES, SearchConfig(grid=[0.0, -1.0]))
    with pytest.raises(SolverError, match="empty"):
        parse_method("dynamic", NAMES, SearchConfig(grid=[]))


def test_solver_error_is_a_value_error():
    assert issubclass(SolverError, ValueError)
    assert math.isfinite(Dynamic().a_max)


def test_continuous_joint_solver_works_under_inference_mode():
    """The server decodes under torch.inference_mode; the continuous solver uses autograd."""
    z_l, z_s, z_e = setting(B=3, T=4, seed=21)
    solver = Dynamic(strategy="joint")  # 21**4 candidates > max_product: continuous refine
    w_ref, j_ref = solver.solve(z_l, z_s, z_e)
    with torch.inference_mode():
        w, j = solver.solve(z_l.clone(), z_s.clone(), z_e.clone())
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(j, j_ref)
