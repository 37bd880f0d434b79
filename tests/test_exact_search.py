"""The exact weight search (search.py) against the full grid scan, the reference: the same weights
and the same J, bit for bit, over thousands of random and adversarial logit sets."""

import logging
import math
import shutil

import pytest
import torch

from logitfusion.engine.members import Logits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitfusion.engine import search
from logitfusion.engine.fusion import moves_of, one_expert_moves, prepare
from logitfusion.engine.fusion import grid_search, one_expert_candidates
from logitfusion.engine.solvers import Dynamic, make_grid

GRIDS = {
    "paper": make_grid(0.0, 2.0, 0.1),
    "fine": make_grid(0.0, 2.0, 0.05),
    "coarse": [0.0, 0.5, 1.0, 2.0],
    "no zero": make_grid(0.5, 2.0, 0.1),
    "repeats": [0.0, 0.5, 0.5, 1.0, 1.0, 1.5],
    "one point": [1.0],
    "wide": make_grid(0.0, 8.0, 0.5),
}
KINDS = ["random", "tuned", "peaked", "flat", "unmoved", "near tie", "huge", "masked", "masked -inf",
         "integers", "twin experts", "large is small"]


def logit_sets(kind: str, B: int, T: int, V: int, scale: float, seed: int):
    """B logit sets (large [B, V], small [B, V], experts [B, T, V]) of one adversarial kind."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    z_l, z_s = scale * randn(B, V), scale * randn(B, V)
    z_e = z_s[:, None] + scale * torch.rand(B, T, 1, generator=g) * randn(B, T, V)
    if kind == "random":  # experts unrelated to the small base: huge targets
        z_e = scale * randn(B, T, V)
    elif kind == "peaked":  # one token dominates one of the models, per row
        who = torch.randint(0, 3, (B,), generator=g)
        tok = torch.randint(0, V, (B,), generator=g)
        rows = torch.arange(B)
        boost = 30 * max(scale, 1.0)
        z_l[rows[who == 0], tok[who == 0]] += boost
        z_s[rows[who == 1], tok[who == 1]] += boost
        z_e[rows[who == 2], :, tok[who == 2]] += boost
    elif kind == "flat":  # nearly uniform everywhere: J nearly flat in a
        z_l, z_s = 1e-4 * z_l, 1e-4 * z_s
        z_e = z_s[:, None] + 1e-6 * randn(B, T, V)
    elif kind == "unmoved":  # an expert equal to its base: J is the same at every a
        z_e = z_s[:, None].expand(B, T, V).clone()
        z_e[:, 1:] += scale * randn(B, T - 1, V)
    elif kind == "near tie":  # barely moved experts: tiny targets, minima within rounding
        z_e = z_s[:, None] + 1e-5 * scale * randn(B, T, V)
    elif kind == "huge":
        z_l, z_s, z_e = 1e3 * z_l, 1e3 * z_s, 1e3 * z_e
    elif kind in ("masked", "masked -inf"):  # tokens masked in every model (-inf: J is NaN)
        fill = -1e4 if kind == "masked" else -math.inf
        mask = torch.rand(B, V, generator=g) < 0.5
        mask[:, 0] = False
        z_l[mask] = fill
        z_s[mask] = fill
        z_e[mask[:, None].expand(B, T, V)] = fill
        if kind == "masked -inf":  # half the rows: masked in the large model only (J finite)
            z_s[B // 2:] = z_s[B // 2:].clamp_min(-1e4)
            z_e[B // 2:] = z_e[B // 2:].clamp_min(-1e4)
    elif kind == "integers":  # quantised logits: exact ties between tokens and between weights
        z_l, z_s, z_e = z_l.round(), z_s.round(), z_e.round()
    elif kind == "twin experts":  # equal experts: equal J across experts, the first must win
        z_e = z_e[:, :1].expand(B, T, V).clone()
    elif kind == "large is small":  # J = 0 is reachable at a = 1
        z_l = z_s.clone()
    return z_l, z_s, z_e


def assert_same_as_scan(z_l, z_s, z_e, grid, **kwargs):
    grid = torch.tensor(sorted(grid), dtype=torch.float32)
    want_a, want_j = grid_search(z_l, z_s, z_e, one_expert_candidates(grid, z_e.shape[1]))
    got_a, got_j = search.exact_search(z_l, z_s, z_e, grid, **kwargs)
    bad = ~((got_a == want_a).all(-1) & ((got_j == want_j) | (got_j.isnan() & want_j.isnan())))
    assert not bad.any(), (bad.nonzero().flatten().tolist(), got_a[bad], want_a[bad], got_j[bad], want_j[bad])


@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(KINDS), grid=st.sampled_from(sorted(GRIDS)), T=st.sampled_from([1, 1, 2, 4]),
       B=st.sampled_from([1, 5, 32]), V=st.integers(2, 3000), scale=st.sampled_from([0.01, 0.3, 1.0, 3.0, 10.0]),
       seed=st.integers(0, 2**31 - 1))
@pytest.mark.slow
def test_exact_search_returns_the_full_scans_argmin_and_j(kind, grid, T, B, V, scale, seed):
    """600 batches of 1, 5 or 32 logit sets (~7,500 sets): weights and J bit for bit."""
    if kind in ("unmoved", "twin experts") and T == 1:
        T = 2
    assert_same_as_scan(*logit_sets(kind, B, T, V, scale, seed), GRIDS[grid], compiled=False)


@pytest.mark.slow
def test_exact_search_at_a_real_vocabulary_and_batch():
    """Vocabulary 32k and 49k, batches of 1, 2 and 8, two threads: the sizes where the search is
    used, and where torch splits a one-output reduction across threads (another summation
    order: the search must never ask for one where the scan did not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        for i, kind in enumerate(KINDS):
            B, V = [(1, 49152), (2, 32000), (8, 32000)][i % 3]
            assert_same_as_scan(*logit_sets(kind, B, 1 + (i % 2), V, 3.0, i), GRIDS["paper"], compiled=False)
    finally:
        torch.set_num_threads(threads)


def test_exact_search_evaluates_far_fewer_points_than_the_scan(monkeypatch):
    """On fine-tuned-like logits a batch is settled by about 60% of the grid, and J is taken
    with the reference code at one or two points per row."""
    kernel_points, reference_points = [], []
    evaluate, objective_of = search.evaluate, search.objective_of

    def count_kernel(compiled, *args):
        kernel_points.append(args[-1].shape[1])
        return evaluate(compiled, *args)

    def count_reference(prepared, candidates):
        reference_points.append(candidates.shape[0] * candidates.shape[1])
        return objective_of(prepared, candidates)

    monkeypatch.setattr(search, "evaluate", count_kernel)
    monkeypatch.setattr(search, "objective_of", count_reference)
    for seed in range(10):
        assert_same_as_scan(*logit_sets("tuned", 16, 1, 2000, 3.0, seed), GRIDS["paper"], compiled=False)
    assert sum(kernel_points) / 10 <= 13, kernel_points  # of 21 (11.8 when written; a batch shares each call)
    assert sum(reference_points) / (10 * 16) <= 1.5, reference_points


def exact_moves(prepared, weights):
    """KL(P_a||P), KL(P||P_a) in float64 from the same float32 inputs, one expert: [B, T, G]."""
    _, _, deltas, log_p, mean_p = prepared
    shift = weights.double()[None, None, :, None] * deltas.double()[:, :, None]  # [B, T, G, V]
    x = log_p.double()[:, None, None] + shift
    log_partition = x.logsumexp(-1)
    fwd = (x.softmax(-1) * shift).sum(-1) - log_partition
    return fwd, log_partition - weights.double() * mean_p.double()[..., None]


@pytest.mark.parametrize("kind", KINDS)
def test_rounding_bounds_hold_with_room_to_spare(kind):
    """The search trusts |computed - exact| <= bound for F = KL(P_a||P) and R = KL(P||P_a), in the
    reference and in its kernel: the a-priori bound (`global_bounds`) anywhere, and SAFETY (3)
    times the kernel's own first-order bound where it ran. Against float64 the worst error stays
    under 1/40 of the first and 2/3 of the second (4.5x headroom)."""
    grid = torch.tensor(GRIDS["wide"])
    worst_global = worst_local = 0.0
    for seed, (V, scale) in enumerate([(7, 1.0), (3000, 0.3), (3000, 3.0), (20000, 10.0)]):
        prepared = prepare(*logit_sets(kind, 4, 2, V, scale, seed))
        _, _, deltas, log_p, mean_p = prepared
        eps_f, eps_r, _ = search.global_bounds(deltas, log_p, mean_p, float(grid[-1]))
        if not torch.isfinite(eps_f).all():
            continue  # the search runs the scan
        want_f, want_r = exact_moves(prepared, grid)  # [B, T, G]
        B, T, G = want_f.shape
        cands = one_expert_candidates(grid, T)  # [T * G, T], expert-major
        ref_f, ref_r = (m.view(B, T, G).double() for m in moves_of(prepared, cands))
        expert = torch.arange(T).repeat_interleave(G).expand(B, -1)
        ker_f, ker_r, err_f, err_r = (m.view(B, T, G) for m in one_expert_moves(
            log_p, deltas, mean_p, expert, grid.repeat(T).expand(B, -1)))
        for got_f, got_r in ((ref_f, ref_r), (ker_f, ker_r)):
            miss_f, miss_r = (got_f - want_f).abs(), (got_r - want_r).abs()
            worst_global = max(worst_global, (miss_f / eps_f[..., None]).max().item(),
                               (miss_r / eps_r[..., None]).max().item())
            worst_local = max(worst_local, (miss_f / err_f).max().item(), (miss_r / err_r).max().item())
    assert worst_global < 1 / 40, worst_global
    assert worst_local < 2 / 3 and search.SAFETY >= 3, worst_local


def test_dynamic_solver_exact_search_equals_scan():
    """Through the solver: search='exact' and search='scan' give the same Choice."""
    grid = GRIDS["paper"]
    for T in (1, 3):
        z = logit_sets("tuned", 6, T, 500, 3.0, T)
        for strategy in ("fast", "joint") if T == 1 else ("fast",):
            exact = Dynamic(grid, strategy=strategy, search="exact")(Logits.ordered(Dynamic().reads, [z[0], z[1], *z[2].unbind(1)]))
            scan = Dynamic(grid, strategy=strategy, search="scan")(Logits.ordered(Dynamic().reads, [z[0], z[1], *z[2].unbind(1)]))
            assert torch.equal(exact.weights, scan.weights) and torch.equal(exact.objective, scan.objective)
            assert torch.equal(exact.logits, scan.logits)
    with torch.inference_mode():  # as the server calls it
        exact = Dynamic(grid, search="exact")(Logits.ordered(Dynamic().reads, [z[0], z[1], *z[2].unbind(1)]))
    assert torch.equal(exact.weights, scan.weights) and torch.equal(exact.objective, scan.objective)


def test_auto_keeps_the_scan_at_the_zoos_sizes():
    """The bundled zoo (vocabulary 1024, batch <= 8, 4 experts) stays on the reference scan: its
    outputs and the test suite's cannot change, and nothing is compiled."""
    assert not search.pays(8 * 4 * 21 * 1024)
    assert search.pays(8 * 1 * 21 * 32000) == search.compiled_available()


def test_dynamic_rejects_an_unknown_search():
    with pytest.raises(ValueError, match="unknown dynamic search"):
        Dynamic(search="bisect")


def test_a_failed_compile_falls_back_to_eager_with_one_log_line(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(search, "_compiled", {})
    monkeypatch.setattr(search, "_compile_failed", False)
    monkeypatch.setattr(torch, "compile", broken)
    z = logit_sets("tuned", 4, 1, 300, 3.0, 0)
    with caplog.at_level(logging.WARNING, logger="logitfusion.engine.search"):
        assert_same_as_scan(*z, GRIDS["paper"], compiled=True)
        assert_same_as_scan(*z, GRIDS["paper"], compiled=True)
    assert [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()] == [
        "logitfusion: torch.compile of the weight search failed (RuntimeError: no C++ compiler); "
        "using the eager kernel"]
    assert not search.compiled_available()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_compiled_kernel_matches_eager_and_the_search_stays_exact():
    """One compile (~5-20 s): the compiled kernel agrees with the eager one to rounding, and the
    compiled search gives the scan's answer."""
    if not search.compiled_available():
        pytest.skip("torch.compile is off or failed in this process")
    kinds = ["tuned", "peaked", "near tie", "twin experts", "integers", "masked"]
    z = [torch.cat(parts) for parts in zip(*(logit_sets(k, 8, 2, 4099, 3.0, i) for i, k in enumerate(kinds)))]
    _, _, deltas, log_p, mean_p = prepare(*z)
    B = z[0].shape[0]
    expert = torch.randint(0, 2, (B, 6), generator=torch.Generator().manual_seed(0))
    weight = torch.rand(B, 6, generator=torch.Generator().manual_seed(1)) * 2
    eager = one_expert_moves(log_p, deltas, mean_p, expert, weight)
    compiled = search.evaluate(True, log_p, deltas, mean_p, expert, weight)
    # Both lie within their bound of the exact value (the search's assumption): so within twice
    # of each other, and the bounds agree to rounding.
    f_e, r_e, err_f, err_r = eager
    f_c, r_c, err_f_c, err_r_c = compiled
    assert ((f_c - f_e).abs() <= 2 * err_f).all() and ((r_c - r_e).abs() <= 2 * err_r).all()
    assert torch.allclose(err_f_c, err_f, rtol=1e-3) and torch.allclose(err_r_c, err_r, rtol=1e-3)
    assert_same_as_scan(*z, GRIDS["paper"], compiled=True)
