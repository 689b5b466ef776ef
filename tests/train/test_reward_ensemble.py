"""Reward-model ensembles in one jitted step (``rlhf_jax.train.reward_ensemble``).

* the vmapped K-member step == K separate single-model ``reward_step`` calls, after one and
  after two steps (SGD with momentum and per-member global-norm clipping, so the stacked
  optimizer state and the per-member clip both matter): with Poisson bootstrap weights, member
  k's reference step runs on the batch with row b repeated ``w[k, b]`` times (padded with
  filler rows to one static size), which is what the weighted loss claims to be; with
  ``bootstrap="none"`` (all weights 1), two microbatches and the state sharded on the 8 fake
  devices (members replicated, each sharded ``fsdp=4 x tensor=2``), on the plain batch on one
  device;
* the jitted step traces once for two calls;
* evaluation: every member's and the ensemble's metrics, and the rollout scores
  (aggregated score, member scores, between-member std) against float64 NumPy from
  independent single-model forwards;
* the shared-trunk K-heads variant == K separate scalar models on that trunk whose trunk is
  not trained (scores, and heads after one and two steps); the WARM average of the heads
  scores the mean of the members' scores (a linear head);
* initialisation: shared trunk (optionally perturbed), distinct or shared head inits, errors.

Discontinuous metrics (accuracies) are compared only after checking the scores are far
from every tie (``TIE``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax.losses.ensemble import warm_average
from rlhf_jax.models.model import Model
from rlhf_jax.sharding import MeshConfig, make_mesh, shard_batch
from rlhf_jax.train import reward, reward_ensemble as ens
from rlhf_jax.train.reward import RewardConfig
from rlhf_jax.train.state import create_train_state
from tests.train._tiny import (TINY, TraceCounter, assert_tree_close, host, on_device,
                               pref_batch, reduced)

MODEL = Model(TINY, kind="scalar")
K = 3
TX = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1, momentum=0.9))
RCFG = RewardConfig(loss="pairwise")
RNG = 11            # the ensemble state's key
ROWS = 16           # static size of the duplicated reference batches
ATOL = 1e-5
TIE = 1e-4
_CAND = jax.jit(reward.candidate_scores, static_argnums=0)


def _batch():
    """8 comparisons, rows 3 and 7 filler rows (``valid`` False), as the data pipeline pads."""
    b = pref_batch(8, 2, 12, seed=1)
    valid, loss = b.valid.copy(), b.loss_mask.copy()
    valid[[3, 7]] = False
    loss[[3, 7]] = False
    return b.replace(valid=valid, loss_mask=loss)


def _duplicated(batch, counts, rows: int = ROWS):
    """Row b of the counted rows repeated ``counts[b]`` times, then filler rows up to ``rows``."""
    counted = np.asarray(batch.valid).all(axis=1)
    index = np.repeat(np.arange(len(counts)), np.where(counted, counts, 0).astype(int))
    assert len(index) <= rows, f"{len(index)} duplicated rows exceed the static size {rows}"
    out = jax.tree.map(lambda x: np.asarray(x)[np.concatenate([index, np.zeros(rows - len(index),
                                                                                 int)])], batch)
    filler = np.arange(rows) >= len(index)
    return out.replace(valid=out.valid & ~filler[:, None],
                       loss_mask=out.loss_mask & ~filler[:, None, None])


@functools.cache
def _base():
    """Host parameters of ``MODEL`` drawn with NumPy (norm scales 1, other leaves N(0, 0.05²)):
    cheaper than compiling an init, and any parameters serve these comparisons."""
    rng = np.random.default_rng(0)

    def leaf(path, a):
        if "scale" in jax.tree_util.keystr(path):
            return np.ones(a.shape, a.dtype)
        return (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)
    return jax.tree_util.tree_map_with_path(leaf, MODEL.abstract_params())


@functools.cache
def _members():
    """Host ``[K, ...]`` params: the shared trunk perturbed per member, distinct head inits."""
    return host(ens.init_ensemble_params(MODEL, on_device(_base()), K, jax.random.key(5),
                                         trunk_noise=0.02))


def _weights(step: int, batch_size: int = 8):
    return np.asarray(ens.bootstrap_weights(jax.random.key(RNG), step, K, batch_size))


def _single_state(params, tx=TX):
    return create_train_state(on_device(params), tx, jax.random.key(0))


@functools.cache
def _reference_step(tx=TX):
    return reward.make_reward_step(MODEL, tx, RCFG)


def test_bootstrap_weights():
    w = _weights(0)
    assert w.shape == (K, 8) and w.dtype == np.float32
    assert np.all(w >= 0) and np.all(w == np.round(w))
    np.testing.assert_array_equal(w, _weights(0))                 # a function of (key, step)
    assert not np.array_equal(w, _weights(1))
    assert len({tuple(row) for row in w}) == K                    # members resample differently
    many = np.stack([_weights(s) for s in range(64)])            # 1536 draws of Poisson(1)
    assert abs(many.mean() - 1.0) < 0.1 and abs(many.var() - 1.0) < 0.2
    np.testing.assert_array_equal(np.asarray(ens.bootstrap_weights(jax.random.key(0), 0, K, 8,
                                                                   "none")), np.ones((K, 8)))


def test_ensemble_step_equals_member_steps_on_bootstrap_duplicated_rows(monkeypatch):
    batch, params0 = _batch(), _members()
    counter = TraceCounter(ens.ensemble_reward_step)
    monkeypatch.setattr(ens, "ensemble_reward_step", counter)
    step = ens.make_ensemble_reward_step(MODEL, TX, ens.EnsembleConfig(num_members=K))
    state = ens.create_ensemble_state(on_device(params0), TX, jax.random.key(RNG))
    ref_states = [_single_state(ens.member(params0, k)) for k in range(K)]
    for s in range(2):
        w = _weights(s)
        assert (w != 1).any()  # the bootstrap is not trivial
        state, metrics = step(state, on_device(batch))
        got = reduced(metrics)
        for k in range(K):
            ref_states[k], ref_metrics = _reference_step()(ref_states[k],
                                                           on_device(_duplicated(batch, w[k])))
            ref = reduced(ref_metrics)
            assert_tree_close(host(ens.member(state.params, k)), host(ref_states[k].params),
                              atol=ATOL)
            for name in ("loss", "margin", "chosen"):
                assert got[f"rm/member{k}/{name}"] == pytest.approx(ref[f"rm/{name}"], abs=ATOL)
            assert got[f"train/member{k}/grad_norm"] == pytest.approx(ref["train/grad_norm"],
                                                                     rel=1e-5, abs=ATOL)
        assert int(state.step) == s + 1
    assert counter.count == 1  # one trace for two calls


def _sharded(cfg, params0):
    """The ensemble step and state on the ``(fsdp=4, tensor=2)`` mesh of 8 fake devices (the
    member axis replicated, each member sharded like one model), with the batch sharded."""
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    shardings = ens.ensemble_state_shardings(
        ens.ensemble_param_shardings(MODEL, mesh), TX,
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params0), mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda p, r: ens.create_ensemble_state(p, TX, r),
                        out_shardings=shardings)(params0, jax.random.key(RNG))
        batch = shard_batch(_batch(), mesh)
        step = ens.make_ensemble_reward_step(
            MODEL, TX, cfg, state_sharding=shardings,
            batch_sharding=jax.tree.map(lambda x: x.sharding, batch))
        state, metrics = step(state, batch)
    assert state.params["trunk"]["embed"].sharding.spec == P(None, "tensor", "fsdp")
    return state, metrics


def test_unit_weights_microbatched_and_sharded_equal_the_plain_step():
    """``bootstrap="none"`` with two microbatches, on 8 devices when there are: every member
    after one step equals the plain 1-device ``reward_step`` on the batch."""
    batch, params0 = _batch(), _members()
    cfg = ens.EnsembleConfig(num_members=K, bootstrap="none",
                             reward=RewardConfig(loss="pairwise", num_microbatches=2))
    if jax.device_count() >= 8:
        state, metrics = _sharded(cfg, params0)
    else:
        state, metrics = ens.make_ensemble_reward_step(MODEL, TX, cfg)(
            ens.create_ensemble_state(on_device(params0), TX, jax.random.key(RNG)),
            on_device(batch))
    got = reduced(metrics)
    plain = reward.make_reward_step(MODEL, TX, RCFG)
    losses = []
    for k in range(K):
        ref_state, ref_metrics = plain(_single_state(ens.member(params0, k)), on_device(batch))
        assert_tree_close(host(ens.member(state.params, k)), host(ref_state.params), atol=ATOL)
        assert got[f"rm/member{k}/loss"] == pytest.approx(reduced(ref_metrics)["rm/loss"], abs=ATOL)
        losses.append(reduced(ref_metrics)["rm/loss"])
    # Unweighted, every member counts the same 6 prompts: the pooled loss is the member mean.
    assert got["rm/loss"] == pytest.approx(np.mean(losses), abs=ATOL)


def _member_candidate_scores(params_list, batch):
    return np.stack([np.asarray(_CAND(MODEL, on_device(p), on_device(batch)), np.float64)
                     for p in params_list])


def test_eval_metrics_and_rollout_scores_against_numpy():
    batch, params0 = _batch(), _members()
    lam = 0.5
    cfg = ens.EnsembleConfig(num_members=K, aggregation="mean_minus_std", uncertainty_coef=lam)
    s = _member_candidate_scores([ens.member(params0, k) for k in range(K)], batch)  # [K, B, 2]
    counted = np.asarray(batch.valid).all(axis=1)
    agg = s.mean(axis=0) - lam * s.std(axis=0, ddof=0)                                # [B, 2]
    diff = agg[counted, 0] - agg[counted, 1]
    member_diff = s[:, counted, 0] - s[:, counted, 1]
    assert np.abs(diff).min() > TIE and np.abs(member_diff).min() > TIE  # far from ties

    got = reduced(ens.make_ensemble_reward_eval(MODEL, cfg)(on_device(params0), on_device(batch)))
    assert got["rm/ensemble/accuracy"] == pytest.approx(np.mean(diff > 0))
    assert got["rm/ensemble/loss"] == pytest.approx(np.mean(np.logaddexp(0.0, -diff)), abs=ATOL)
    assert got["rm/ensemble/margin"] == pytest.approx(diff.mean(), abs=ATOL)
    std = s.std(axis=0, ddof=0)[counted]
    assert got["rm/ensemble/std"] == pytest.approx(std.mean(), abs=ATOL)
    for k in range(K):
        assert got[f"rm/member{k}/accuracy"] == pytest.approx(np.mean(member_diff[k] > 0))
        assert got[f"rm/member{k}/loss"] == pytest.approx(
            np.mean(np.logaddexp(0.0, -member_diff[k])), abs=ATOL)
    assert got["rm/accuracy"] == pytest.approx(np.mean(member_diff > 0))

    # Rollout scores of the B * N sequences, each member normalised by its own gain and bias.
    gain, bias = np.array([1.0, 2.0, 0.5], np.float32), np.array([0.0, -1.0, 0.3], np.float32)
    flat = lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:])
    out = ens.make_ensemble_scores(MODEL, cfg)(on_device(params0), flat(batch.tokens),
                                               flat(batch.positions), flat(batch.attn_mask),
                                               gain, bias)
    members = s.reshape(K, -1) * gain[:, None].astype(np.float64) + bias[:, None]
    np.testing.assert_allclose(np.asarray(out["members"]), members, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["std"]), members.std(axis=0, ddof=0), atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["score"]),
                               members.mean(axis=0) - lam * members.std(axis=0, ddof=0), atol=ATOL)


def _frozen_trunk_tx():
    """The same optimizer on the head only; the trunk gets zero updates."""
    return optax.multi_transform({"train": TX, "frozen": optax.set_to_zero()},
                                 {"trunk": "frozen", "value_head": "train"})


def test_shared_trunk_heads_equal_separate_scalar_models_on_that_trunk():
    batch, trunk = _batch(), _base()
    heads0 = host(ens.init_heads(MODEL, K, jax.random.key(7)))
    separate = [{"trunk": trunk["trunk"], "value_head": ens.member(heads0, k)["value_head"]}
                for k in range(K)]
    s = _member_candidate_scores(separate, batch)

    scores = ens.make_multihead_scores(MODEL)
    flat = lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:])
    out = scores(on_device(heads0), on_device(trunk), flat(batch.tokens), flat(batch.positions),
                 flat(batch.attn_mask))
    np.testing.assert_allclose(np.asarray(out["members"]), s.reshape(K, -1), atol=ATOL)

    # WARM of linear heads on one trunk == the mean of the members' scores.
    avg = _member_candidate_scores([{"trunk": trunk["trunk"], **warm_average(heads0)}], batch)[0]
    np.testing.assert_allclose(avg, s.mean(axis=0), atol=ATOL)

    cfg = ens.EnsembleConfig(num_members=K, aggregation="min")
    step = ens.make_multihead_reward_step(MODEL, TX, cfg)
    state = ens.create_ensemble_state(on_device(heads0), TX, jax.random.key(RNG))
    frozen_tx = _frozen_trunk_tx()
    ref_step = _reference_step(frozen_tx)
    refs = [_single_state(p, frozen_tx) for p in separate]
    trunk_dev = on_device(trunk)
    for st in range(2):
        w = _weights(st)
        state, metrics = step(state, on_device(batch), trunk_dev)
        got = reduced(metrics)
        for k in range(K):
            refs[k], ref_metrics = ref_step(refs[k], on_device(_duplicated(batch, w[k])))
            assert_tree_close(host(ens.member(state.params, k)["value_head"]),
                              host(refs[k].params["value_head"]), atol=ATOL)
            assert got[f"rm/member{k}/loss"] == pytest.approx(reduced(ref_metrics)["rm/loss"],
                                                              abs=ATOL)
        assert "rm/ensemble/accuracy" in got and "rm/ensemble/std" in got
    assert_tree_close(host(refs[0].params["trunk"]), trunk["trunk"], atol=0.0)  # not trained
    assert_tree_close(host(trunk_dev), trunk, atol=0.0)                         # not donated


def test_initialisation():
    base, members = _base(), _members()
    kernels = members["value_head"]["kernel"]
    assert kernels.shape == (K, TINY.d_model)
    assert all(not np.allclose(kernels[i], kernels[j]) for i in range(K) for j in range(i))
    delta = members["trunk"]["embed"] - base["trunk"]["embed"][None]   # trunk_noise=0.02
    assert 0.015 < delta.std() < 0.025 and not np.allclose(delta[0], delta[1])
    shared = host(ens.init_ensemble_params(MODEL, on_device(base), 2, jax.random.key(1),
                                           shared_head_init=True))
    for k in range(2):
        assert_tree_close(ens.member(shared, k)["trunk"], base["trunk"], atol=0.0)
    np.testing.assert_array_equal(shared["value_head"]["kernel"][0],
                                  shared["value_head"]["kernel"][1])
    # A fresh head: std 1/sqrt(D+1) as Model.init draws it, bias 0.
    assert 0.5 / np.sqrt(TINY.d_model + 1) < shared["value_head"]["kernel"][0].std() < 2 / np.sqrt(
        TINY.d_model + 1)
    np.testing.assert_array_equal(shared["value_head"]["bias"], 0.0)

    with pytest.raises(ValueError, match="needs a kind='scalar' model, got 'lm'"):
        ens.init_ensemble_params(Model(TINY), base, 2, jax.random.key(0))
    bad = {"trunk": dict(base["trunk"], embed=base["trunk"]["embed"][:10])}
    with pytest.raises(ValueError, match=r"params\['trunk'\]\['embed'\] has shape \(10, 32\)"):
        ens.init_ensemble_params(MODEL, bad, 2, jax.random.key(0))
    with pytest.raises(ValueError, match="num=0 must be >= 1"):
        ens.init_ensemble_params(MODEL, base, 0, jax.random.key(0))
    with pytest.raises(ValueError, match="needs heads_model"):
        ens.multihead_reward_step(None, None, None, model=MODEL, tx=TX)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_members": 0}, r"num_members must be >= 1, got 0"),
    ({"bootstrap": "multinomial"}, r"bootstrap must be 'poisson' or 'none', got 'multinomial'"),
    ({"aggregation": "median"}, r"aggregation 'median' is not one of mean, mean_minus_std"),
    ({"uncertainty_coef": -1.0}, r"uncertainty_coef must be >= 0, got -1.0"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ens.EnsembleConfig(**kwargs)


@pytest.mark.parametrize("loss", ["pairwise", "ranking", "best_of_n"])
def test_weighted_loss_equals_the_masked_loss_on_duplicated_rows(loss):
    """Integer weights == rows repeated, for every loss of ``RewardConfig`` (no model)."""
    rng = np.random.default_rng(3)
    n = 2 if loss == "pairwise" else 4
    scores = rng.normal(size=(6, n)).astype(np.float32)
    valid = np.ones((6, n), bool)
    valid[1] = False                                   # a filler row
    if n == 4:
        valid[2, 3:] = False                           # a ranking of 3
        valid[3, 1:] = False                           # one response: no pair
    weights = np.array([2, 3, 0, 1, 4, 1], np.float32)
    cfg = RewardConfig(loss=loss, center_coef=0.1 if loss == "pairwise" else 0.0)
    counted = np.asarray(reward.counted_prompts(jnp.asarray(valid), cfg))
    total = max((weights * counted).sum(), 1.0)
    got_loss, got = ens.weighted_preference_loss(jnp.asarray(scores), jnp.asarray(valid),
                                                 jnp.asarray(weights), jnp.asarray(total), cfg)
    rows = np.repeat(np.arange(6), weights.astype(int))
    ref_loss, ref = reward.masked_preference_loss(
        jnp.asarray(scores[rows]), jnp.asarray(valid[rows]),
        reward.num_counted_prompts(jnp.asarray(valid[rows]), cfg), cfg)
    assert float(got_loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert reduced(got) == pytest.approx(reduced(ref), rel=1e-6)
