"""The offline preference losses added to the DPO family (KTO, BCO, APO, NCA, DPOP, EXO, SPPO,
the CPO/RPO NLL term), each against its paper formula written in float64 NumPy; the unpaired
data format and batches KTO trains on; and one KTO step through the trainer."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.data.config import BatchConfig
from rlhf_jax.data.datasets import load_unpaired
from rlhf_jax.data.records import RecordError, parse_unpaired
from rlhf_jax.data.unpaired import UnpairedExample, collate_unpaired
from rlhf_jax.losses import dpo, dpo_variants as dv, kto
from rlhf_jax.tasks.sentiment.ratings import SentimentRating
from rlhf_jax.tasks.sentiment.records import sentiment_unpaired_records
from rlhf_jax.train import dpo as dpo_train


def _logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _sig(x):
    return np.exp(_logsig(x))


def _mean(m, k):
    return float(m[k][0]) / float(m[k][1])


def _pairs(B=8, seed=0):
    """Sequence log-prob sums (negative, tens of nats) of policy/reference, chosen/rejected,
    with log-ratios of a few nats either way, and response lengths."""
    rng = np.random.default_rng(seed)
    rc, rr = (-(rng.random(B) * 30 + 5) for _ in range(2))
    pc, pr = rc + rng.normal(0, 3, B), rr + rng.normal(0, 3, B)
    lc = rng.integers(5, 40, size=B).astype(np.float64)
    return [np.asarray(x, np.float32) for x in (pc, pr, rc, rr, lc)]


def _f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


# ---- KTO ------------------------------------------------------------------------------------

def _kto_inputs(B=10, seed=0, kl_shift=1.0):
    rng = np.random.default_rng(seed)
    ref = -(rng.random(B) * 30 + 5)
    pol = ref + rng.normal(0, 2, B)
    label = rng.random(B) < 0.5
    label[:2] = (True, False)
    kl_ref = -(rng.random(B) * 30 + 5)
    kl_pol = kl_ref + rng.normal(kl_shift, 1, B)
    return [np.asarray(x, np.float32) for x in (pol, ref)] + [label] + \
        [np.asarray(x, np.float32) for x in (kl_pol, kl_ref)]


def _kto_reference(pol, ref, label, kl_pol, kl_ref, beta, lam_d, lam_u):
    """Ethayarajh et al. 2024 eq. 8, E[λ_y - v(x, y)], with z0 of §4."""
    pol, ref, kl_pol, kl_ref = _f64(pol, ref, kl_pol, kl_ref)
    z0 = max(0.0, float(np.mean(kl_pol - kl_ref)))
    r = pol - ref
    v = np.where(label, lam_d * _sig(beta * (r - z0)), lam_u * _sig(beta * (z0 - r)))
    lam_y = np.where(label, lam_d, lam_u)
    return float(np.mean(lam_y - v)), z0


def test_kto_eq8_with_the_mismatched_pair_reference_point():
    pol, ref, label, kl_pol, kl_ref = _kto_inputs()
    beta, lam_d, lam_u = 0.3, 1.0, 1.33
    want, z0 = _kto_reference(pol, ref, label, kl_pol, kl_ref, beta, lam_d, lam_u)
    assert z0 > 0.5  # the clamp is not what is tested here
    loss, m = kto.kto_loss(pol, ref, label, kl_pol, kl_ref, beta=beta, desirable_weight=lam_d,
                           undesirable_weight=lam_u)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "dpo/loss"), want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "kto/kl"), z0, rtol=1e-5)
    r = beta * (np.float64(pol) - np.float64(ref))
    np.testing.assert_allclose(_mean(m, "dpo/rewards/desirable"), r[label].mean(), rtol=1e-4)
    np.testing.assert_allclose(_mean(m, "dpo/rewards/undesirable"), r[~label].mean(), rtol=1e-4)
    np.testing.assert_allclose(_mean(m, "dpo/logps/desirable"), np.float64(pol)[label].mean(),
                               rtol=1e-6)
    # A reference point computed elsewhere (a trainer's whole batch) gives the same loss.
    z0_jax = kto.kto_reference_point(kl_pol, kl_ref)
    np.testing.assert_allclose(z0_jax, z0, rtol=1e-5)
    again, _ = kto.kto_loss(pol, ref, label, reference_point=z0_jax, beta=beta,
                            desirable_weight=lam_d, undesirable_weight=lam_u)
    np.testing.assert_allclose(again, loss, rtol=1e-6)


def test_kto_reference_point_is_clamped_and_carries_no_gradient():
    pol, ref, label, kl_pol, kl_ref = _kto_inputs(seed=1, kl_shift=-2.0)
    beta = 0.5
    want, z0 = _kto_reference(pol, ref, label, kl_pol, kl_ref, beta, 1.0, 1.0)
    assert z0 == 0.0  # mean log-ratio of the mismatched pairs < 0: clamped
    f = lambda p, k: kto.kto_loss(p, ref, label, k, kl_ref, beta=beta)[0]
    loss, (g_pol, g_kl) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(pol),
                                                                 jnp.asarray(kl_pol))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert not np.any(np.asarray(g_kl))  # no backpropagation through z0 (§4)
    # d/dr of λ_D (1 - σ(β r)) is -β σ(β r) σ(-β r); of λ_U (1 - σ(-β r)), +β σ σ.
    r = np.float64(pol) - np.float64(ref)
    s = _sig(beta * r) * _sig(-beta * r)
    np.testing.assert_allclose(g_pol, np.where(label, -beta, beta) * s / len(r), rtol=1e-4)
    # With a positive z0, the gradient still ignores z0's dependence on the policy.
    z = jnp.float32(1.5)
    g = jax.grad(lambda p: kto.kto_loss(p, ref, label, reference_point=z, beta=beta)[0])(pol)
    a = np.where(label, beta * (r - 1.5), beta * (1.5 - r))
    np.testing.assert_allclose(g, np.where(label, -beta, beta) * _sig(a) * _sig(-a) / len(r),
                               rtol=1e-4)


def test_kto_rejects_misuse():
    pol, ref, label, kl_pol, kl_ref = _kto_inputs()
    with pytest.raises(ValueError, match="reference_point"):
        kto.kto_loss(pol, ref, label)
    with pytest.raises(ValueError, match="not both"):
        kto.kto_loss(pol, ref, label, kl_pol, kl_ref, reference_point=0.0)
    with pytest.raises(ValueError, match="desirable_weight"):
        kto.kto_loss(pol, ref, label, reference_point=0.0, desirable_weight=0.0)
    with pytest.raises(ValueError, match="shape"):
        kto.kto_loss(pol, ref[:3], label, reference_point=0.0)
    with pytest.raises(ValueError, match="unpaired"):
        dpo.dpo_loss(pol, ref, pol, ref, loss_type="kto")
    with pytest.raises(ValueError, match="unpaired"):
        dpo_train.DPOConfig(loss_type="kto", nll_coef=0.1)
    with pytest.raises(ValueError, match="undesirable_weight"):
        dpo_train.DPOConfig(loss_type="kto", undesirable_weight=-1.0)
    spec = dpo.DPO_LOSSES["kto"]
    assert spec.unpaired and spec.needs_reference and dpo_train.DPOConfig(loss_type="kto").unpaired


# ---- the pairwise variants ------------------------------------------------------------------

def _bco_reference(PC, PR, RC, RR, beta):
    c, r = beta * (PC - RC), beta * (PR - RR)
    delta = np.mean(np.concatenate([c, r]))
    return np.mean(-_logsig(c - delta) - _logsig(-(r - delta))), delta


# name -> float64 per-pair loss from the paper, given the log-ratios c, r (nats) and β.
_PAPER = {
    "apo_zero": lambda c, r, b: -_sig(b * c) + _sig(b * r),                 # APO eq. 4
    "apo_down": lambda c, r, b: _sig(b * c) - _sig(b * (c - r)),            # APO eq. 5
    "nca_pair": lambda c, r, b: -_logsig(b * c) - 0.5 * _logsig(-b * c) - 0.5 * _logsig(-b * r),
    "sppo_hard": lambda c, r, b: (c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2,  # η = 1/β
}


@pytest.mark.parametrize("name", sorted(_PAPER))
def test_pairwise_variant_matches_its_paper_formula(name):
    pc, pr, rc, rr, _ = _pairs(seed=3)
    beta = 0.4
    PC, PR, RC, RR = _f64(pc, pr, rc, rr)
    want = np.mean(_PAPER[name](PC - RC, PR - RR, beta))
    loss, m = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=name)
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(_mean(m, "dpo/loss"), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(_mean(m, "dpo/rewards/chosen"), np.mean(beta * (PC - RC)), rtol=1e-4)
    # At π_θ = π_ref the anchored losses are 0 (APO), NCA is 2 log 2, SPPO 2 (1/(2β))².
    at_ref = float(dpo.dpo_loss(pc, pr, pc, pr, beta=beta, loss_type=name)[0])
    np.testing.assert_allclose(at_ref, np.mean(_PAPER[name](0.0 * PC, 0.0 * PR, beta)),
                               rtol=1e-6, atol=1e-7)


def test_bco_pair_reward_shift_is_the_batch_mean_without_gradient():
    pc, pr, rc, rr, _ = _pairs(seed=4)
    beta = 0.2
    PC, PR, RC, RR = _f64(pc, pr, rc, rr)
    want, delta = _bco_reference(PC, PR, RC, RR, beta)
    loss, m = dv.bco_pair_loss(pc, pr, rc, rr, beta=beta)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "bco/delta"), delta, rtol=1e-4, atol=1e-6)
    # δ given explicitly (a whole batch's) replaces the batch mean.
    other, _ = dv.bco_pair_loss(pc, pr, rc, rr, beta=beta, delta=0.7)
    c, r = beta * (PC - RC), beta * (PR - RR)
    np.testing.assert_allclose(other, np.mean(-_logsig(c - 0.7) - _logsig(0.7 - r)), rtol=1e-5)
    # d/dπ_c with δ held fixed: -β σ(-(β c - δ)) / B.
    g = jax.grad(lambda x: dv.bco_pair_loss(x, pr, rc, rr, beta=beta)[0])(jnp.asarray(pc))
    np.testing.assert_allclose(g, -beta * _sig(-(c - delta)) / len(c), rtol=1e-4)


def test_bco_in_the_trainer_reads_the_whole_batch_shift():
    """The trainer's per-pair masked mean with the whole batch's δ, summed over two halves,
    equals the full-batch loss: BCO does not depend on the microbatching."""
    pc, pr, rc, rr, lc = _pairs(B=6, seed=5)
    cfg = dpo_train.DPOConfig(loss_type="bco_pair", beta=0.3)
    policy, ref = np.stack([pc, pr], 1), np.stack([rc, rr], 1)
    lengths, valid = np.stack([lc, lc], 1), np.ones((6, 2), bool)
    full, _ = dpo_train.masked_dpo_loss(policy, lengths, ref, valid, np.float32(6), cfg)
    want, delta = _bco_reference(*_f64(pc, pr, rc, rr), 0.3)
    np.testing.assert_allclose(full, want, rtol=1e-5)
    stats = dpo_train.pair_statistics(policy, ref, valid, cfg)
    np.testing.assert_allclose(stats["delta"], delta, rtol=1e-4, atol=1e-6)
    halves = [dpo_train.masked_dpo_loss(policy[s], lengths[s], ref[s], valid[s], np.float32(6),
                                        cfg, stats)[0] for s in (slice(0, 3), slice(3, 6))]
    np.testing.assert_allclose(sum(halves), want, rtol=1e-5)


def test_dpop_eq3_penalises_a_chosen_likelihood_below_the_reference():
    pc, pr, rc, rr, _ = _pairs(seed=6)
    beta, lam = 0.1, 50.0
    PC, PR, RC, RR = _f64(pc, pr, rc, rr)
    c, r = PC - RC, PR - RR
    assert (c < 0).any() and (c > 0).any()
    want = np.mean(-_logsig(beta * (c - r - lam * np.maximum(0.0, RC - PC))))
    loss, m = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="dpop", dpop_lambda=lam)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "dpop/penalty"), np.mean(np.maximum(0, -c)), rtol=1e-4)
    # Chosen likelihood at or above the reference's: exactly DPO.
    up = np.maximum(pc, rc)
    np.testing.assert_allclose(dv.dpop_loss(up, pr, rc, rr, beta=beta, lam=lam)[0],
                               dpo.dpo_sigmoid_loss(up, pr, rc, rr, beta=beta)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="dpop_lambda"):
        dv.dpop_loss(pc, pr, rc, rr, lam=-1.0)


def test_exo_is_the_reverse_kl_to_the_smoothed_label():
    pc, pr, rc, rr, _ = _pairs(seed=7)
    beta = 0.5
    PC, PR, RC, RR = _f64(pc, pr, rc, rr)
    z = beta * ((PC - RC) - (PR - RR))
    for eps, given in ((0.1, 0.1), (1e-3, 0.0)):  # 0 means the paper's / TRL's 1e-3
        p = _sig(z)
        want = np.mean(p * (np.log(p) - np.log(1 - eps)) + (1 - p) * (np.log(1 - p) - np.log(eps)))
        loss, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="exo_pair",
                               label_smoothing=given)
        np.testing.assert_allclose(loss, want, rtol=1e-4)
    # The minimum, 0, sits at β h = log((1 - ε) / ε).
    eps = 0.2
    h = np.float32(np.log((1 - eps) / eps) / beta)
    zero, _ = dv.exo_pair_loss(np.float32([h]), np.float32([0.0]), np.float32([0.0]),
                               np.float32([0.0]), beta=beta, label_smoothing=eps)
    assert abs(float(zero)) < 1e-6


# ---- the CPO / RPO NLL term -------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "nca_pair"])
def test_nll_coef_adds_the_per_token_chosen_nll(loss_type):
    pc, pr, rc, rr, lc = _pairs(seed=8)
    lr_ = lc[::-1].copy()
    alpha = 0.7
    kw = dict(beta=0.3, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr_)
    base, bm = dpo.dpo_loss(pc, pr, rc, rr, **kw)
    loss, m = dpo.dpo_loss(pc, pr, rc, rr, nll_coef=alpha, **kw)
    nll = np.mean(-np.float64(pc) / np.float64(lc))  # RPO: per token, then over pairs
    np.testing.assert_allclose(loss, float(base) + alpha * nll, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "dpo/nll"), nll, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "dpo/loss"), float(base) + alpha * nll, rtol=1e-5)
    assert "dpo/nll" not in bm
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo.dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, nll_coef=alpha)
    with pytest.raises(ValueError, match="nll_coef"):
        dpo.dpo_loss(pc, pr, rc, rr, nll_coef=-1.0, **kw)
    # The trainer passes the lengths whenever the NLL term is on.
    cfg = dpo_train.DPOConfig(loss_type=loss_type, beta=0.3, nll_coef=alpha)
    got, _ = dpo_train.masked_dpo_loss(np.stack([pc, pr], 1), np.stack([lc, lr_], 1),
                                       np.stack([rc, rr], 1), np.ones((8, 2), bool),
                                       np.float32(8), cfg)
    np.testing.assert_allclose(got, loss, rtol=1e-5)


# ---- unpaired data ----------------------------------------------------------------------------

def test_parse_unpaired_accepts_the_format_and_names_what_is_wrong():
    rec = parse_unpaired({"prompt": "Write.", "completion": "Lovely.", "label": True}, "u.jsonl:3")
    assert (rec.prompt, rec.completion, rec.label) == ("Write.", "Lovely.", True)
    conv = [{"role": "user", "content": "Write."}, {"role": "assistant", "content": "Dull."}]
    rec = parse_unpaired({"completion": conv, "label": False}, "u.jsonl:4")
    assert rec.prompt == (conv[0],) and rec.completion == "Dull." and rec.label is False
    for raw, reason, field in (
            ({"prompt": "a", "completion": "b", "label": "yes"}, "wrong_type", "'label'"),
            ({"prompt": "a", "completion": "b", "label": 1}, "wrong_type", "'label'"),
            ({"prompt": "a", "completion": "b"}, "missing_field", "'label'"),
            ({"prompt": "a", "label": True}, "missing_field", "'completion'"),
            ({"prompt": " ", "completion": "b", "label": True}, "empty_text", "'prompt'"),
            ({"completion": "b", "label": True}, "missing_field", "'prompt'"),
            ({"prompt": "other", "completion": conv, "label": True}, "bad_value", "'prompt'")):
        with pytest.raises(RecordError) as e:
            parse_unpaired(raw, "u.jsonl:9")
        assert e.value.reason == reason and str(e.value).startswith("u.jsonl:9: ")
        assert field in str(e.value)


def _example(prompt, completion, label):
    return UnpairedExample(prompt=np.asarray(prompt, np.int32),
                           completion=np.asarray(completion, np.int32), label=label)


def test_collate_unpaired_builds_the_mismatched_pairs():
    exs = [_example([1, 5], [7, 8, 2], True), _example([1, 6, 6], [9, 2], False),
           _example([1], [3, 3, 3, 3, 2], True)]
    b = collate_unpaired(exs, np.array([True, True, False]), 8, pad_id=0, buckets=(8, 16))
    assert b.tokens.shape == b.kl_tokens.shape == (3, 8)
    np.testing.assert_array_equal(b.label, [True, False, True])
    np.testing.assert_array_equal(b.valid, [True, True, False])
    for i, e in enumerate(exs):
        nxt = exs[(i + 1) % 3].completion
        for toks, attn, loss, pos, comp in (
                (b.tokens, b.attn_mask, b.loss_mask, b.positions, e.completion),
                (b.kl_tokens, b.kl_attn_mask, b.kl_loss_mask, b.kl_positions, nxt)):
            n = len(e.prompt) + len(comp)
            np.testing.assert_array_equal(toks[i, :n], np.concatenate([e.prompt, comp]))
            assert attn[i].sum() == n and not toks[i, n:].any()
            np.testing.assert_array_equal(pos[i, :n], np.arange(n))
            # Targets: the completion only, and none at all on a filler row.
            assert loss[i].sum() == (len(comp) if i < 2 else 0)
            assert loss[i, len(e.prompt):n].all() == (i < 2)
    # The padded length grows to the bucket that fits a longer mismatched pair ...
    long = [_example([1, 4, 4, 4, 4, 4], [2], True), _example([1], [5, 5, 5, 5, 5, 2], False)]
    assert collate_unpaired(long, np.ones(2, bool), 8, 0, (8, 16)).tokens.shape == (2, 16)
    # ... and a pair longer than the last bucket keeps its completion's first tokens.
    capped = collate_unpaired(long, np.ones(2, bool), 8, 0, (8,))
    assert capped.tokens.shape == (2, 8)
    np.testing.assert_array_equal(capped.kl_tokens[0], [1, 4, 4, 4, 4, 4, 5, 5])


def test_load_unpaired_reads_jsonl_and_names_a_bad_line(tmp_path):
    from data._tok import build_tokenizer  # the tiny in-memory BPE of tests/data

    tok = build_tokenizer(tmp_path / "tok")
    rows = [{"prompt": "Write a short movie review.", "completion": "A delight.", "label": True},
            {"prompt": "Write a short movie review.", "completion": "Dull.", "label": False},
            {"prompt": "Write a short movie review.", "completion": "Lovely.", "label": True}]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = BatchConfig(batch_size=3, buckets=(32, 64), shuffle=False)
    ds = load_unpaired(str(path), tok, cfg)
    assert (len(ds), ds.num_desirable, ds.num_undesirable) == (3, 2, 1)
    batch = next(ds.batches(cfg))
    np.testing.assert_array_equal(batch.label, [True, False, True])
    n0 = len(ds[0].prompt)  # same prompt everywhere: KL row 0 ends with example 1's completion
    np.testing.assert_array_equal(batch.kl_tokens[0, n0:n0 + len(ds[1].completion)],
                                  ds[1].completion)
    path.write_text(path.read_text() + json.dumps({**rows[0], "label": "true"}) + "\n")
    with pytest.raises(RecordError, match=r"u\.jsonl:4: field 'label' is str"):
        load_unpaired(str(path), tok, cfg)


def test_sentiment_unpaired_labels_are_the_sign_of_the_human_mean():
    texts = ["a fine and warm film", "a dull and tired film", "a film of some kind here",
             "an utterly lovely piece", "slightly off in places"]
    means = [2.1, -1.5, 0.0, 3.0, -0.2]
    ratings = [SentimentRating(id=str(i), domain="movie_reviews", text=t, mean=m, ratings=(1,))
               for i, (t, m) in enumerate(zip(texts, means))]
    recs = sentiment_unpaired_records(ratings, min_words=3)
    assert [(r["id"], r["label"]) for r in recs] == [("0", True), ("1", False), ("3", True),
                                                    ("4", False)]
    assert all(r["prompt"] == "Write a sentence from a movie review." for r in recs)
    assert [r["id"] for r in sentiment_unpaired_records(ratings, threshold=0.5,
                                                        min_words=3)] == ["0", "1", "3"]


# ---- one KTO step through the trainer ---------------------------------------------------------

def test_a_kto_step_lowers_its_loss_on_a_tiny_batch():
    from train._tiny import TINY  # the tiny Llama of the train-step tests

    from rlhf_jax.models.model import Model
    from rlhf_jax.train.state import create_train_state

    rng = np.random.default_rng(0)
    exs = [_example(rng.integers(3, 64, size=rng.integers(2, 6)),
                    list(rng.integers(3, 64, size=rng.integers(2, 8))) + [2], bool(i % 2))
           for i in range(6)]
    one = functools.partial(jax.device_put, device=jax.devices()[0])  # committed: one compile
    batch = one(collate_unpaired(exs, np.ones(6, bool), 16, 0, (16,)))
    model = Model(TINY)
    params = one(jax.jit(model.init)(jax.random.key(0)))
    tx = optax.sgd(0.5)
    cfg = dpo_train.DPOConfig(loss_type="kto", beta=0.5, desirable_weight=1.2)
    step = dpo_train.make_dpo_step(model, tx, cfg)
    state = one(create_train_state(params, tx, jax.random.key(1)))
    losses = []
    for _ in range(3):
        state, m = step(state, batch, params)
        losses.append(_mean(m, "dpo/loss"))
        if len(losses) == 1:  # policy == reference: z0 = 0 and every row's loss is λ_y / 2
            assert abs(_mean(m, "kto/kl")) < 1e-6
            np.testing.assert_allclose(losses[0], np.mean([0.6 if e.label else 0.5 for e in exs]),
                                       rtol=1e-5)
    assert losses[2] < losses[1] < losses[0], losses
    with pytest.raises(ValueError, match="precomputed"):
        dpo_train.make_dpo_step(model, tx, cfg, precomputed=True)
    # The held-out evaluation of an unpaired loss reads pairs: implicit rewards, no loss
    # (shapes only: no second compile).
    pairs = dpo_train.PreferenceBatch(
        tokens=np.stack([batch.tokens[:2], batch.kl_tokens[:2]], 1),
        attn_mask=np.stack([batch.attn_mask[:2], batch.kl_attn_mask[:2]], 1),
        positions=np.stack([batch.positions[:2], batch.kl_positions[:2]], 1),
        loss_mask=np.stack([batch.loss_mask[:2], batch.kl_loss_mask[:2]], 1),
        valid=np.ones((2, 2), bool))
    metrics = jax.eval_shape(dpo_train.make_dpo_eval(model, cfg), state.params, params, pairs)
    assert "dpo/rewards/margins" in metrics and "dpo/loss" not in metrics
