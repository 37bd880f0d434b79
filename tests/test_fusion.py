"""Fusion maths (method.md §2-4) against plain hand-written references. No models."""

import math

import pytest
import torch

from logitfusion.engine.fusion import fuse, kl, kl_targets, objective


def rand_logits(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def setting(B=3, T=2, V=11, seed=0):
    z_l = rand_logits(B, V, seed=seed)
    z_s = rand_logits(B, V, seed=seed + 1)
    z_e = z_s[:, None] + rand_logits(B, T, V, seed=seed + 2, scale=1.0)
    return z_l, z_s, z_e


# ------------------------------------------------------------------ plain-Python references

def py_softmax(z):
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    return [x / s for x in e]


def py_kl(p, q):
    """KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))."""
    return sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))


def py_objective(z_l, z_s, z_e, a):
    """J(a) exactly as written in method.md §4 (§3 when T = 1), in float64 Python floats.

    z_l, z_s: [V] lists; z_e: [T][V]; a: [T].
    """
    V, T = len(z_l), len(z_e)
    P = py_softmax(z_l)
    Q = py_softmax(z_s)
    z_a = [z_l[v] + sum(a[t] * (z_e[t][v] - z_s[v]) for t in range(T)) for v in range(V)]
    P_a = py_softmax(z_a)
    J = 0.0
    for t in range(T):
        Q_t = py_softmax(z_e[t])
        J += (py_kl(P_a, P) - py_kl(Q_t, Q)) ** 2 + (py_kl(P, P_a) - py_kl(Q, Q_t)) ** 2
    return J


def assert_rel_close(got, want, rel=1e-4, abs_=1e-7):
    assert abs(got - want) <= rel * abs(want) + abs_, (got, want)


# ------------------------------------------------------------------ fuse

@pytest.mark.parametrize("weight_shape", ["T", "BT"])
def test_fuse_matches_hand_computed_sum(weight_shape):
    B, T, V = 4, 3, 9
    z_l, z_s, z_e = setting(B, T, V, seed=1)
    torch.manual_seed(5)
    w = torch.rand(T) * 2 if weight_shape == "T" else torch.rand(B, T) * 2
    got = fuse(z_l, z_s, z_e, w)
    assert got.shape == (B, V)
    for b in range(B):
        for v in range(V):
            want = z_l[b, v].item()
            for t in range(T):
                a = w[t].item() if weight_shape == "T" else w[b, t].item()
                want += a * (z_e[b, t, v].item() - z_s[b, v].item())
            assert got[b, v].item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_fuse_zero_weights_is_large_and_unit_weight_is_proxy_tuning():
    z_l, z_s, z_e = setting(2, 1, 13, seed=2)
    torch.testing.assert_close(fuse(z_l, z_s, z_e, torch.zeros(1)), z_l)
    torch.testing.assert_close(fuse(z_l, z_s, z_e, torch.ones(1)), z_l + z_e[:, 0] - z_s)


def test_fuse_per_sequence_weights_differ_per_row():
    z_l, z_s, z_e = setting(2, 2, 7, seed=3)
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    got = fuse(z_l, z_s, z_e, w)
    torch.testing.assert_close(got[0], z_l[0] + (z_e[0, 0] - z_s[0]))
    torch.testing.assert_close(got[1], z_l[1] + 2 * (z_e[1, 1] - z_s[1]))


def test_fuse_computes_in_float32_from_half_inputs():
    z_l, z_s, z_e = setting(2, 2, 7, seed=4)
    got = fuse(z_l.bfloat16(), z_s.bfloat16(), z_e.bfloat16(), torch.tensor([0.5, 1.5]))
    assert got.dtype == torch.float32
    want = fuse(z_l.bfloat16().float(), z_s.bfloat16().float(), z_e.bfloat16().float(), torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ kl, kl_targets

def test_kl_matches_torch_kl_div_and_manual_sum():
    torch.manual_seed(0)
    a, b = torch.randn(5, 17) * 2, torch.randn(5, 17) * 2
    log_p, log_q = a.log_softmax(-1), b.log_softmax(-1)
    got = kl(log_p, log_q)
    # F.kl_div(input=log Q, target=log P, log_target=True) sums P (log P - log Q) = KL(P || Q)
    ref = torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(got, ref)
    for r in range(5):
        manual = py_kl(py_softmax(a[r].tolist()), py_softmax(b[r].tolist()))
        assert_rel_close(got[r].item(), manual)
    assert (got > 0).all()  # distinct distributions
    torch.testing.assert_close(kl(log_p, log_p), torch.zeros(5))


def test_kl_is_not_symmetric_so_argument_order_matters():
    torch.manual_seed(1)
    log_p = (torch.randn(3, 11) * 3).log_softmax(-1)
    log_q = (torch.randn(3, 11) * 3).log_softmax(-1)
    assert not torch.allclose(kl(log_p, log_q), kl(log_q, log_p))


def test_kl_targets_are_forward_and_reverse_kl_of_each_expert():
    B, T, V = 3, 4, 10
    z_l, z_s, z_e = setting(B, T, V, seed=7)
    fwd, rev = kl_targets(z_s, z_e)
    assert fwd.shape == rev.shape == (B, T)
    for b in range(B):
        Q = py_softmax(z_s[b].tolist())
        for t in range(T):
            Q_t = py_softmax(z_e[b, t].tolist())
            assert_rel_close(fwd[b, t].item(), py_kl(Q_t, Q))  # KL(Q_t || Q)
            assert_rel_close(rev[b, t].item(), py_kl(Q, Q_t))  # KL(Q || Q_t)


def test_kl_targets_are_zero_for_an_unchanged_expert():
    z_l, z_s, _ = setting(2, 1, 8, seed=8)
    fwd, rev = kl_targets(z_s, z_s[:, None].clone())
    torch.testing.assert_close(fwd, torch.zeros(2, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(rev, torch.zeros(2, 1), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ objective J

@pytest.mark.parametrize("T", [1, 2, 3])
def test_objective_matches_python_loop_reference_shared_candidates(T):
    B, V = 2, 7
    z_l, z_s, z_e = setting(B, T, V, seed=10 + T)
    torch.manual_seed(T)
    cands = torch.rand(5, T) * 2
    cands[0] = 0.0
    got = objective(z_l, z_s, z_e, cands)
    assert got.shape == (B, 5)
    zl64, zs64, ze64 = z_l.double().tolist(), z_s.double().tolist(), z_e.double().tolist()
    for b in range(B):
        for c in range(5):
            want = py_objective(zl64[b], zs64[b], ze64[b], cands[c].double().tolist())
            assert_rel_close(got[b, c].item(), want)


def test_objective_matches_reference_with_per_sequence_candidates():
    B, T, V, C = 3, 2, 6, 4
    z_l, z_s, z_e = setting(B, T, V, seed=21)
    torch.manual_seed(2)
    cands = torch.rand(B, C, T) * 2
    got = objective(z_l, z_s, z_e, cands)
    assert got.shape == (B, C)
    for b in range(B):
        for c in range(C):
            want = py_objective(z_l[b].tolist(), z_s[b].tolist(), z_e[b].tolist(), cands[b, c].tolist())
            assert_rel_close(got[b, c].item(), want)
    # shared [C, T] candidates equal the same candidates given per sequence
    shared = objective(z_l, z_s, z_e, cands[0])
    torch.testing.assert_close(shared[0], got[0])


def test_objective_at_zero_is_sum_of_squared_targets():
    B, T, V = 4, 3, 12
    z_l, z_s, z_e = setting(B, T, V, seed=30)
    fwd, rev = kl_targets(z_s, z_e)
    j0 = objective(z_l, z_s, z_e, torch.zeros(1, T))[:, 0]
    want = (fwd ** 2 + rev ** 2).sum(-1)
    torch.testing.assert_close(j0, want, rtol=1e-5, atol=1e-7)
    assert (j0 > 0).all()


def test_objective_is_zero_when_large_equals_small_and_a_is_one():
    """With P = Q, a = 1 moves P exactly as fine-tuning moved Q (one expert): J(1) = 0 < J(0)."""
    _, z_s, z_e = setting(3, 1, 9, seed=31)
    j = objective(z_s.clone(), z_s, z_e, torch.tensor([[0.0], [1.0]]))
    torch.testing.assert_close(j[:, 1], torch.zeros(3), atol=1e-9, rtol=0)
    assert (j[:, 0] > 1e-6).all()


def test_objective_is_invariant_to_per_row_logit_shifts():
    B, T, V = 2, 2, 8
    z_l, z_s, z_e = setting(B, T, V, seed=32)
    cands = torch.tensor([[0.0, 0.0], [0.5, 1.0], [2.0, 0.3]])
    j = objective(z_l, z_s, z_e, cands)
    j_shift = objective(z_l + 3.0, z_s - 1.0, z_e + 7.0, cands)
    torch.testing.assert_close(j, j_shift, rtol=1e-4, atol=1e-6)
