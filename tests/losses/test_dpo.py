"""dpo.py: every variant against its paper formula written in float64 NumPy."""
import functools
import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import dpo, dpo_variants


def _jit(f, **kw):
    return jax.jit(functools.partial(f, **kw))


def _logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _inputs(B=8, seed=0):
    rng = np.random.default_rng(seed)
    # Sequence log-prob sums: negative, tens of nats.
    pc, pr, rc, rr = (-(rng.random(B) * 30 + 5).astype(np.float32) for _ in range(4))
    lc = rng.integers(5, 40, size=B).astype(np.float32)
    lr = rng.integers(5, 40, size=B).astype(np.float32)
    return pc, pr, rc, rr, lc, lr


def _f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


def _mean(m, k):
    return float(m[k][0]) / float(m[k][1])


def test_sigmoid_dpo_eq7_and_metrics():
    pc, pr, rc, rr, _, _ = _inputs()
    beta = 0.1
    loss, m = _jit(dpo.dpo_sigmoid_loss, beta=beta)(pc, pr, rc, rr)
    PC, PR, RC, RR = _f64(pc, pr, rc, rr)
    want = np.mean(-_logsig(beta * ((PC - RC) - (PR - RR))))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "dpo/loss"), want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "dpo/rewards/chosen"), np.mean(beta * (PC - RC)), rtol=1e-4)
    np.testing.assert_allclose(_mean(m, "dpo/rewards/rejected"), np.mean(beta * (PR - RR)), rtol=1e-4)
    np.testing.assert_allclose(
        _mean(m, "dpo/rewards/margins"), np.mean(beta * (PC - RC - PR + RR)), rtol=1e-4, atol=1e-6
    )
    # An accuracy compared across float32 (the loss) and float64 (here): the inputs must be far
    # from a tie, so that rounding cannot flip a pair.
    assert np.min(np.abs((PC - RC) - (PR - RR))) > 1e-3
    np.testing.assert_allclose(_mean(m, "dpo/rewards/accuracies"), np.mean((PC - RC) > (PR - RR)))
    np.testing.assert_allclose(_mean(m, "dpo/logps/chosen"), PC.mean(), rtol=1e-6)
    np.testing.assert_allclose(_mean(m, "dpo/logps/rejected"), PR.mean(), rtol=1e-6)


def test_sigmoid_dpo_gradient_closed_form_and_init_values():
    pc, pr, rc, rr, _, _ = _inputs(B=5, seed=1)
    beta = 0.5
    g = jax.jit(jax.grad(lambda x: dpo.dpo_sigmoid_loss(x, pr, rc, rr, beta=beta)[0]))(jnp.asarray(pc))
    PC, PR, RC, RR = _f64(pc, pr, rc, rr)
    h = (PC - RC) - (PR - RR)
    # d/dπ_c of -log σ(βh) = -β σ(-βh), divided by B for the mean.
    np.testing.assert_allclose(g, -beta / (1 + np.exp(beta * h)) / 5, rtol=1e-4)
    # Policy == reference: loss log 2, accuracy 0.5 (ties), margins 0.
    loss, m = _jit(dpo.dpo_sigmoid_loss, beta=beta)(pc, pr, pc, pr)
    np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)
    assert _mean(m, "dpo/rewards/accuracies") == 0.5


def test_cdpo_label_smoothing():
    pc, pr, rc, rr, _, _ = _inputs(seed=2)
    beta, eps = 0.2, 0.1
    loss, _ = _jit(dpo.dpo_sigmoid_loss, beta=beta, label_smoothing=eps)(pc, pr, rc, rr)
    PC, PR, RC, RR = _f64(pc, pr, rc, rr)
    z = beta * ((PC - RC) - (PR - RR))
    want = np.mean(-(1 - eps) * _logsig(z) - eps * _logsig(-z))
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_robust_dpo_formula_and_reduces_to_dpo():
    pc, pr, rc, rr, _, _ = _inputs(seed=3)
    beta, eps = 0.2, 0.2
    loss, _ = _jit(dpo.robust_dpo_loss, beta=beta, label_smoothing=eps)(pc, pr, rc, rr)
    PC, PR, RC, RR = _f64(pc, pr, rc, rr)
    z = beta * ((PC - RC) - (PR - RR))
    want = np.mean((-(1 - eps) * _logsig(z) + eps * _logsig(-z)) / (1 - 2 * eps))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    a, _ = _jit(dpo.robust_dpo_loss, beta=beta)(pc, pr, rc, rr)
    b, _ = _jit(dpo.dpo_sigmoid_loss, beta=beta)(pc, pr, rc, rr)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.robust_dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)


def test_ipo_eq17_on_average_logps_with_and_without_lengths():
    pc, pr, rc, rr, lc, lr = _inputs(seed=4)
    beta = 0.1
    PC, PR, RC, RR, LC, LR = _f64(pc, pr, rc, rr, lc, lr)
    h = (PC / LC - RC / LC) - (PR / LR - RR / LR)
    want = np.mean((h - 1 / (2 * beta)) ** 2)
    loss, _ = _jit(dpo.ipo_loss, beta=beta)(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    avg = [x / l for x, l in ((pc, lc), (pr, lr), (rc, lc), (rr, lr))]
    loss2, _ = _jit(dpo.ipo_loss, beta=beta)(*avg)
    np.testing.assert_allclose(loss2, want, rtol=1e-5)
    with pytest.raises(ValueError, match="both"):
        dpo.ipo_loss(pc, pr, rc, rr, chosen_lengths=lc)


def test_hinge_slic():
    pc, pr, rc, rr, _, _ = _inputs(seed=5)
    beta = 0.3
    loss, _ = _jit(dpo.hinge_loss, beta=beta)(pc, pr, rc, rr)
    PC, PR, RC, RR = _f64(pc, pr, rc, rr)
    want = np.mean(np.maximum(0.0, 1 - beta * ((PC - RC) - (PR - RR))))
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_simpo_eq6():
    pc, pr, _, _, lc, lr = _inputs(seed=6)
    beta, gamma = 2.0, 0.5
    loss, m = _jit(dpo.simpo_loss, beta=beta, gamma=gamma)(
        pc, pr, chosen_lengths=lc, rejected_lengths=lr
    )
    PC, PR, LC, LR = _f64(pc, pr, lc, lr)
    want = np.mean(-_logsig(beta / LC * PC - beta / LR * PR - gamma))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "dpo/rewards/chosen"), np.mean(beta * PC / LC), rtol=1e-5)


def test_orpo_formula():
    pc, pr, _, _, lc, lr = _inputs(seed=7)
    lam = 0.1
    loss, m = _jit(dpo.orpo_loss, lam=lam)(pc, pr, chosen_lengths=lc, rejected_lengths=lr)
    PC, PR, LC, LR = _f64(pc, pr, lc, lr)
    p_w, p_l = np.exp(PC / LC), np.exp(PR / LR)
    log_or = np.log(p_w / (1 - p_w)) - np.log(p_l / (1 - p_l))
    want = np.mean(-PC / LC - lam * _logsig(log_or))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "orpo/log_odds_ratio"), log_or.mean(), rtol=1e-4, atol=1e-5)
    # Near-certain responses (average log-prob ~ 0) stay finite, value and gradient.
    tiny = jnp.array([-1e-9, -0.0]), jnp.array([-3.0, -1e-12])
    val, g = jax.jit(jax.value_and_grad(lambda a, b: dpo.orpo_loss(a, b)[0]))(*tiny)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))


# The direct call of each loss, written out by hand: a loss added to the registry without an
# entry here fails ``test_dispatcher_routes_to_the_named_loss``.
_DIRECT = {
    "sigmoid": lambda pc, pr, rc, rr, beta, lengths: dpo.dpo_sigmoid_loss(pc, pr, rc, rr,
                                                                          beta=beta),
    "robust": lambda pc, pr, rc, rr, beta, lengths: dpo.robust_dpo_loss(pc, pr, rc, rr, beta=beta),
    "ipo": lambda pc, pr, rc, rr, beta, lengths: dpo.ipo_loss(pc, pr, rc, rr, beta=beta, **lengths),
    "hinge": lambda pc, pr, rc, rr, beta, lengths: dpo.hinge_loss(pc, pr, rc, rr, beta=beta),
    "simpo": lambda pc, pr, rc, rr, beta, lengths: dpo.simpo_loss(pc, pr, beta=beta, **lengths),
    "orpo": lambda pc, pr, rc, rr, beta, lengths: dpo.orpo_loss(pc, pr, lam=beta, **lengths),
    **{name: (lambda pc, pr, rc, rr, beta, lengths, f=f: f(pc, pr, rc, rr, beta=beta))
       for name, f in (("bco_pair", dpo_variants.bco_pair_loss),
                       ("apo_zero", dpo_variants.apo_zero_loss),
                       ("apo_down", dpo_variants.apo_down_loss),
                       ("nca_pair", dpo_variants.nca_pair_loss),
                       ("dpop", dpo_variants.dpop_loss),
                       ("exo_pair", dpo_variants.exo_pair_loss),
                       ("sppo_hard", dpo_variants.sppo_hard_loss))},
}

# The pairwise members (``dpo_loss`` dispatches to them); the unpaired KTO is tested in
# tests/test_losses_offline.py.
PAIRWISE = sorted(k for k, v in dpo.DPO_LOSSES.items() if not v.unpaired)


def test_loss_type_literal_matches_the_registry():
    assert sorted(typing.get_args(dpo.LossType)) == sorted(dpo.DPO_LOSSES)
    assert sorted(_DIRECT) == PAIRWISE
    for name, spec in dpo.DPO_LOSSES.items():
        assert spec.description and spec.source, name
        assert spec.fn.__module__ in (dpo.__name__, "rlhf_jax.losses.reference_free",
                                      dpo_variants.__name__, "rlhf_jax.losses.kto"), name
        assert spec.needs_reference == (spec.fn.__module__ != "rlhf_jax.losses.reference_free"), name
        assert spec.unpaired == (spec.fn.__module__ == "rlhf_jax.losses.kto"), name


@pytest.mark.parametrize("loss_type", PAIRWISE)
def test_dispatcher_routes_to_the_named_loss(loss_type):
    pc, pr, rc, rr, lc, lr = _inputs(seed=8)
    beta = 0.25
    spec = dpo.DPO_LOSSES[loss_type]
    refs = (rc, rr) if spec.needs_reference else ()
    lengths = dict(chosen_lengths=lc, rejected_lengths=lr) if spec.length_normalised else {}
    got, metrics = dpo.dpo_loss(pc, pr, *refs, beta=beta, loss_type=loss_type, **lengths)
    direct, want = _DIRECT[loss_type](pc, pr, rc, rr, beta, lengths)
    np.testing.assert_allclose(got, direct, rtol=1e-6)
    assert metrics.keys() == want.keys()


@pytest.mark.parametrize("loss_type", PAIRWISE)
def test_registry_flags_say_what_each_loss_reads(loss_type):
    """``needs_reference``: the reference log-probs are required and change the loss;
    ``length_normalised``: the lengths change the loss; ``uses_label_smoothing``: a non-zero
    ε is accepted (and changes the loss) rather than rejected."""
    pc, pr, rc, rr, lc, lr = _inputs(seed=10)
    spec = dpo.DPO_LOSSES[loss_type]
    lengths = dict(chosen_lengths=lc, rejected_lengths=lr)
    loss = functools.partial(dpo.dpo_loss, beta=0.5, loss_type=loss_type)
    base = float(loss(pc, pr, rc, rr, **lengths)[0])
    assert np.isfinite(base)

    other_ref = float(loss(pc, pr, rc + 20.0, rr, **lengths)[0])
    assert (other_ref != pytest.approx(base, rel=1e-4)) == spec.needs_reference
    if spec.needs_reference:
        with pytest.raises(ValueError, match="needs ref"):
            loss(pc, pr, **lengths)
    else:
        assert float(loss(pc, pr, **lengths)[0]) == pytest.approx(base, rel=1e-6)

    other_len = float(loss(pc, pr, rc, rr, chosen_lengths=lc + 7.0, rejected_lengths=lr)[0])
    assert (other_len != pytest.approx(base, rel=1e-4)) == spec.length_normalised
    if not spec.length_normalised:  # lengths given or not, the sum-based loss is the same
        assert float(loss(pc, pr, rc, rr)[0]) == pytest.approx(base, rel=1e-6)

    if spec.uses_label_smoothing:
        smoothed = float(loss(pc, pr, rc, rr, label_smoothing=0.2, **lengths)[0])
        assert smoothed != pytest.approx(base, rel=1e-4)
    else:
        with pytest.raises(ValueError, match="label_smoothing"):
            loss(pc, pr, rc, rr, label_smoothing=0.1, **lengths)


def test_unknown_loss_type_lists_the_registry():
    pc, pr, rc, rr, _, _ = _inputs()
    with pytest.raises(ValueError, match=re.escape(str(sorted(dpo.DPO_LOSSES)))):
        dpo.dpo_loss(pc, pr, rc, rr, loss_type="not_a_loss")
    with pytest.raises(ValueError, match="known"):
        dpo.get_dpo_loss("DPO")


def test_dispatcher_accepts_everything_a_trainer_has():
    """Sum-based losses ignore lengths; reference-free losses ignore the reference log-probs."""
    pc, pr, rc, rr, lc, lr = _inputs(seed=9)
    lengths = dict(chosen_lengths=lc, rejected_lengths=lr)
    a, _ = dpo.dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", **lengths)
    b, _ = dpo.dpo_sigmoid_loss(pc, pr, rc, rr)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    c, _ = dpo.dpo_loss(pc, pr, rc, rr, loss_type="simpo", beta=2.0, **lengths)
    d, _ = dpo.simpo_loss(pc, pr, beta=2.0, **lengths)
    np.testing.assert_allclose(c, d, rtol=1e-6)


def test_dispatcher_rejects_misuse():
    pc, pr, rc, rr, lc, lr = _inputs()
    with pytest.raises(ValueError, match="loss_type"):
        dpo.dpo_loss(pc, pr, rc, rr, loss_type="not_a_loss")
    with pytest.raises(ValueError, match="needs ref"):
        dpo.dpo_loss(pc, pr, loss_type="sigmoid")
    with pytest.raises(ValueError, match="both"):
        dpo.dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=lc)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.dpo_loss(pc, pr, rc, rr, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo.dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        dpo.dpo_sigmoid_loss(pc, pr[:3], rc, rr)
