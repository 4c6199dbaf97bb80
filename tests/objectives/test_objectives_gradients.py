"""Gradient checks (float64, finite differences) and finiteness on extreme inputs."""

import math

import pytest
import torch

from megatron_solopo.objectives import longpo_loss, orpo_log_odds, preference_loss, solopo_loss

B = 4
NAMES = ["dpo", "ipo", "simpo", "orpo"]
USES_REF = {"dpo": True, "ipo": True, "simpo": False, "orpo": False}


def _random_logps(generator, low=-40.0, high=-2.0):
    return (torch.rand(B, generator=generator, dtype=torch.float64) * (high - low) + low).requires_grad_()


def _tokens():
    return torch.tensor([3, 7, 12, 20])


def _gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_preference_loss(name, reduction):
    g = torch.Generator().manual_seed(1)
    inputs = [_random_logps(g) for _ in range(4 if USES_REF[name] else 2)]
    kwargs = {"sft_weight": 0.3} if name != "ipo" else {}

    def fn(*x):
        refs = x[2:] if USES_REF[name] else (None, None)
        return preference_loss(name, x[0], x[1], _tokens(), _tokens().flip(0), *refs, reduction=reduction, **kwargs)[0]

    _gradcheck(fn, inputs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ra_distance", ["abs", "squared"])
@pytest.mark.parametrize("ra_on", ["chosen", "both"])
def test_gradcheck_solopo_loss(name, ra_distance, ra_on):
    g = torch.Generator().manual_seed(2)
    n_seq = 4 if ra_on == "both" else 3
    policy = [_random_logps(g) for _ in range(n_seq)]
    refs = [_random_logps(g) for _ in range(n_seq)] if USES_REF[name] else []

    def fn(*x):
        pol, ref = x[:n_seq], x[n_seq:]
        ref = list(ref) + [None] * (4 - len(ref))
        return solopo_loss(
            name, pol[0], pol[1], pol[2], _tokens(), _tokens().flip(0),
            ref[0], ref[1], ref[2],
            long_rejected_logps=pol[3] if n_seq == 4 else None, ref_long_rejected_logps=ref[3],
            alpha=2.0, ra_distance=ra_distance, ra_on=ra_on, reduction="sum",
        )[0]

    _gradcheck(fn, policy + refs)


def test_gradcheck_longpo_loss():
    g = torch.Generator().manual_seed(3)
    inputs = [_random_logps(g) for _ in range(4)]

    def fn(lc, lr, rc, rr):
        return longpo_loss(lc, lr, _tokens(), _tokens().flip(0), rc, rr, nll_weight=0.7, label_smoothing=0.1)[0]

    _gradcheck(fn, inputs)


def test_gradcheck_orpo_log_odds_near_zero():
    # Both branches of log(1 - e^a) (switch at -ln 2) and a close to 0.
    a = torch.tensor([-0.69, -0.7, -0.1, -1e-3, -5.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: orpo_log_odds(x)[0], (a,), eps=1e-9, atol=1e-5, rtol=1e-5)


def test_orpo_log_odds_gradient_closed_form_next_to_clamp():
    # d/da [a - log(1 - e^a)] = 1 / (1 - e^a) = -1 / expm1(a), ~ 1/|a| next to 0
    values = [-1e-4, -2e-6, -0.5, -3.0]
    a = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    orpo_log_odds(a)[0].sum().backward()
    assert a.grad.tolist() == pytest.approx([-1.0 / math.expm1(v) for v in values], rel=1e-12)


def test_orpo_log_odds_accuracy_against_math():
    for a in [-1e-5, -1e-3, -0.3, -0.6931, -0.6932, -2.0, -30.0, -700.0]:
        expected = a - math.log(-math.expm1(a))
        got = orpo_log_odds(torch.tensor([a], dtype=torch.float64))[0].item()
        assert got == pytest.approx(expected, rel=1e-13), a


# ---------------------------------------------------------------------------------- extreme inputs
def _finite_loss_and_grads(fn, inputs):
    loss, metrics = fn(*inputs)
    loss.sum().backward()
    assert torch.isfinite(loss).all(), loss
    for x in inputs:
        assert x.grad is not None and torch.isfinite(x.grad).all(), x.grad
    return loss, metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_margin_is_finite(dtype, name, sign):
    # |z| = 1e4 for the sum-based DPO; the length-averaged objectives see |a_w - a_l| = 1e4 too.
    chosen = torch.tensor([0.0, -1.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1e4, -1.0 - 1e4], dtype=dtype, requires_grad=True)
    if sign < 0:
        chosen, rejected = rejected, chosen
    n = torch.tensor([1, 1])
    refs = [torch.zeros(2, dtype=dtype, requires_grad=True) for _ in range(2)] if USES_REF[name] else []

    def fn(c, r, *ref):
        return preference_loss(name, c, r, n, n, *(ref or (None, None)))

    loss, _ = _finite_loss_and_grads(fn, [chosen, rejected, *refs])
    if name != "ipo" and sign < 0:
        assert loss.item() > 100  # wrong-way margin: large but finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_logps_near_zero_and_positive_are_finite_and_counted(dtype):
    chosen = torch.tensor([0.0, -1e-12, 1e-3, -3.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1e-9, 0.0, -2.0, -1e4], dtype=dtype, requires_grad=True)
    long_chosen = torch.tensor([-1e-30, -5.0, 0.0, -1e4], dtype=dtype, requires_grad=True)
    n = torch.tensor([1, 2, 3, 4])
    loss, m = _finite_loss_and_grads(
        lambda c, r, lc: solopo_loss("orpo", c, r, lc, n, n, reduction="none"), [chosen, rejected, long_chosen]
    )
    # clamped: pair 0 all three, pair 1 two (chosen, rejected), pair 2 two (chosen a > 0, long), pair 3 none
    assert m["orpo/clamped"].tolist() == [3.0, 2.0, 2.0, 0.0]


def test_orpo_log_odds_huge_negative_is_finite():
    a = torch.tensor([-1e4, -1e30], dtype=torch.float32, requires_grad=True)
    log_odds, clamped = orpo_log_odds(a)
    log_odds.sum().backward()
    assert torch.isfinite(log_odds).all() and torch.isfinite(a.grad).all()
    assert not clamped.any()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ra_distance", ["abs", "squared"])
def test_solo_huge_reward_gap_is_finite(name, ra_distance):
    dtype = torch.float32
    short_chosen = torch.tensor([-1.0, -2.0], dtype=dtype, requires_grad=True)
    short_rejected = torch.tensor([-1e4, -3.0], dtype=dtype, requires_grad=True)
    long_chosen = torch.tensor([-1e4, -1e-8], dtype=dtype, requires_grad=True)
    n = torch.tensor([1, 1])
    refs = [torch.zeros(2, dtype=dtype) for _ in range(3)] if USES_REF[name] else [None] * 3
    _finite_loss_and_grads(
        lambda sc, sr, lc: solopo_loss(name, sc, sr, lc, n, n, *refs, alpha=3.0, ra_distance=ra_distance),
        [short_chosen, short_rejected, long_chosen],
    )


def test_long_chosen_gets_gradient_only_from_ra_term():
    """The long sequence enters SoLoPO only through SoLo-RA: its gradient scales with alpha."""
    sc, sr = torch.tensor([-4.0], dtype=torch.float64), torch.tensor([-6.0], dtype=torch.float64)
    n = torch.tensor([2])
    grads = []
    for alpha in (1.0, 3.0):
        lc = torch.tensor([-9.0], dtype=torch.float64, requires_grad=True)
        solopo_loss("simpo", sc, sr, lc, n, n, alpha=alpha)[0].backward()
        grads.append(lc.grad.item())
    # d/d lc of alpha * |beta*sc/n - beta*lc/n| with sc/n > lc/n: -alpha * beta / n = -alpha
    assert grads == pytest.approx([-1.0, -3.0], abs=1e-14)


# ---------------------------------------------------------------------------------- ra_gradient
def _solo_grads(name, ra_on, ra_distance, ra_gradient, alpha, seed=5):
    """Loss and d loss / d (each policy input) of solopo_loss; inputs drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    n_seq = 4 if ra_on == "both" else 3
    policy = [_random_logps(g) for _ in range(n_seq)]
    refs = [_random_logps(g).detach() for _ in range(n_seq)] if USES_REF[name] else [None] * n_seq
    loss, _ = solopo_loss(
        name, policy[0], policy[1], policy[2], _tokens(), _tokens().flip(0), refs[0], refs[1], refs[2],
        long_rejected_logps=policy[3] if n_seq == 4 else None, ref_long_rejected_logps=refs[3] if n_seq == 4 else None,
        alpha=alpha, ra_distance=ra_distance, ra_on=ra_on, ra_gradient=ra_gradient, reduction="sum",
    )
    grads = torch.autograd.grad(loss, policy)
    return loss.detach(), dict(zip(["short_chosen", "short_rejected", "long_chosen", "long_rejected"], grads))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ra_distance", ["abs", "squared"])
@pytest.mark.parametrize("ra_on", ["chosen", "both"])
def test_ra_gradient_long_holds_the_short_side_fixed(name, ra_distance, ra_on):
    po_loss, po_only = _solo_grads(name, ra_on, ra_distance, "long", alpha=0.0)
    long_loss, long_only = _solo_grads(name, ra_on, ra_distance, "long", alpha=2.0)
    both_loss, both = _solo_grads(name, ra_on, ra_distance, "both", alpha=2.0)
    # The value of the objective does not depend on where its gradient flows.
    assert torch.equal(long_loss, both_loss)
    assert not torch.equal(long_loss, po_loss)  # the RA term is active in these inputs
    # Short sequences: under "long" the RA term adds exactly nothing to their gradient (PO term alone) ...
    for key in ("short_chosen", "short_rejected"):
        assert torch.equal(long_only[key], po_only[key]), key
    # ... while under "both" it does (so the check above can fail).
    assert not torch.allclose(both["short_chosen"], po_only["short_chosen"])
    # Long sequences: identical to the formula as written.
    long_keys = ["long_chosen"] + (["long_rejected"] if ra_on == "both" else [])
    for key in long_keys:
        assert torch.equal(long_only[key], both[key]), key
        assert long_only[key].abs().sum() > 0


def test_ra_gradient_is_validated():
    g = torch.Generator().manual_seed(6)
    x = [_random_logps(g) for _ in range(3)]
    with pytest.raises(ValueError, match=r"ra_gradient='short' is not one of \['both', 'long'\]"):
        solopo_loss("orpo", x[0], x[1], x[2], _tokens(), _tokens(), ra_gradient="short")
