"""SFT, reward-model and DPO train steps: invariances, traces and learning.

* microbatched gradients == full-batch gradients (every loss normalises by global
  denominators), checked on the parameters after one step of SGD with learning rate 1, so
  the parameter difference *is* the gradient difference;
* filler rows (``remainder="pad"`` of the data pipeline: ``valid`` all False / no target)
  carry no loss: a batch of 4 real rows + 4 filler rows updates like the 4 rows duplicated;
* the 8-device ``(fsdp=4, tensor=2)`` sharded step with 2 microbatches == the 1-device
  full-batch step (SFT token-mean, pairwise RM, DPO with the reference inside; the other
  variants compare microbatches on one device; one XLA compile costs ~5-10 s on this CPU, so
  the sharded run doubles as those variants' microbatch check);
* each jitted step traces once per shape (same batch shape, any state values) and once more
  for a new length bucket;
* a few steps on a fixed tiny batch lower the loss.

Paths that differ only in float rounding agree on continuous metrics within ``ATOL``; the
discontinuous ones (token argmax accuracy, pair accuracies) are compared only after checking
that the inputs are far from every tie the metric decides (``_tie_distance``).

The optimizer is ``optax.inject_hyperparams(optax.sgd)``: linear in the gradient, and its
learning rate is an array in the state, so the comparisons (lr 1) and the learning runs
(small lr) share one compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.models.model import Model
from rlhf_jax.sharding import shard_batch
from rlhf_jax.losses.dpo import DPO_LOSSES
from rlhf_jax.train import dpo, reward, sft
from rlhf_jax.train.state import create_train_state, state_shardings
from rlhf_jax.types import SFTBatch
from tests.train._tiny import (TINY, TraceCounter, assert_tree_close, fsdp_tensor_mesh, host,
                               host_params, on_device, perturbed, pref_batch, reduced,
                               sft_batch, sharded_params)

TX = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
MODELS = {"lm": Model(TINY), "scalar": Model(TINY, kind="scalar")}
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 (fake) devices, have {jax.device_count()}")


def _with_lr(state, lr: float):
    hp = dict(state.opt_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hp))


def _filler(batch, rows):
    """Mark ``rows`` as filler rows the way the data pipeline does (tokens stay real)."""
    if isinstance(batch, SFTBatch):
        loss = batch.loss_mask.copy()
        loss[rows] = False
        return batch.replace(loss_mask=loss)
    valid, loss = batch.valid.copy(), batch.loss_mask.copy()
    valid[rows] = False
    loss[rows] = False
    return batch.replace(valid=valid, loss_mask=loss)


def _take(batch, rows):
    return jax.tree.map(lambda x: np.asarray(x)[np.asarray(rows)], batch)


@dataclasses.dataclass(frozen=True)
class Variant:
    algo: str                     # "sft" | "rm" | "dpo"
    cfg: object                   # SFTConfig | RewardConfig | DPOConfig
    batch: Callable[..., object]  # (t) -> host batch with T = t
    micro: int                    # microbatches compared with 1
    learn_lr: float               # SGD learning rate of the learning run
    precomputed: bool = False     # DPO: reference log-probs precomputed outside the step

    @property
    def kind(self):
        return "scalar" if self.algo == "rm" else "lm"

    @property
    def loss_key(self):
        return {"sft": "sft/loss", "rm": "rm/loss", "dpo": "dpo/loss"}[self.algo]

    @property
    def module(self):
        return {"sft": sft, "rm": reward, "dpo": dpo}[self.algo]

    @property
    def step_name(self):
        if self.precomputed:
            return "dpo_step_precomputed"
        return {"sft": "sft_step", "rm": "reward_step", "dpo": "dpo_step"}[self.algo]

    def make(self, cfg=None, **shardings):
        cfg = self.cfg if cfg is None else cfg
        model = MODELS[self.kind]
        if self.algo == "sft":
            return sft.make_sft_step(model, TX, cfg, **shardings)
        if self.algo == "rm":
            return reward.make_reward_step(model, TX, cfg, **shardings)
        return dpo.make_dpo_step(model, TX, cfg, precomputed=self.precomputed, **shardings)


def _ranking_batch(t=12):
    # K = 4 slots; rows with 4, 3, 2, 1 (no pair) and 0 (a filler row) valid candidates.
    counts = np.array([4, 3, 2, 1, 0, 4, 3, 2])
    valid = np.arange(4)[None, :] < counts[:, None]
    return pref_batch(8, 4, t, seed=3, valid=valid)


def _pair_batch(t=12, seed=1):
    return _filler(pref_batch(8, 2, t, seed=seed), [3, 7])


VARIANTS = {
    "sft-token": Variant("sft", sft.SFTConfig(reduction="token"), lambda t=12: sft_batch(8, t),
                         2, 0.5),
    "sft-sequence": Variant("sft", sft.SFTConfig(reduction="sequence"),
                            lambda t=12: sft_batch(8, t, seed=2), 4, 0.5),
    "rm-pairwise": Variant("rm", reward.RewardConfig(loss="pairwise"), _pair_batch, 2, 0.05),
    "rm-ranking": Variant("rm", reward.RewardConfig(loss="ranking"), _ranking_batch, 4, 0.05),
    "dpo-sigmoid": Variant("dpo", dpo.DPOConfig(loss_type="sigmoid"), _pair_batch, 2, 2.0),
    # IPO (per-token averages) through the precomputed-reference path.
    "dpo-ipo": Variant("dpo", dpo.DPOConfig(loss_type="ipo"), _pair_batch, 2, 2.0,
                       precomputed=True),
}
MAIN = ["sft-token", "rm-pairwise", "dpo-sigmoid"]  # microbatched + sharded, traced, trained


@functools.cache
def _ref():
    """The DPO reference: the policy's parameters perturbed (so the two differ)."""
    return perturbed(host_params("lm"), scale=0.05, seed=7)


_REF_LOGPS = dpo.make_reference_logps(MODELS["lm"])


def _frozen(v: Variant, batch):
    if v.algo != "dpo":
        return ()
    if v.precomputed:
        return (_REF_LOGPS(on_device(_ref()), batch),)
    return (on_device(_ref()),)


def _run(v: Variant, step, state, batch):
    return step(state, batch, *_frozen(v, batch))


class _Baseline:
    """The variant's 1-device, full-batch step (traced through a counter) and its result."""

    def __init__(self, v: Variant):
        self.counter = TraceCounter(getattr(v.module, v.step_name))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(v.module, v.step_name, self.counter)
            self.step = v.make()
        self.params0 = host_params(v.kind)
        new_state, metrics = _run(v, self.step, self.fresh(v), v.batch())
        self.params = host(new_state.params)
        self.metrics = reduced(metrics)
        self.tie_distance = _tie_distance(v, v.batch())
        assert int(new_state.step) == 1

    @staticmethod
    def fresh(v: Variant, lr: float = 1.0):
        state = create_train_state(on_device(host_params(v.kind)), TX, jax.random.key(1))
        return _with_lr(state, lr)


_BASELINES: dict[str, _Baseline] = {}


def baseline(name: str) -> _Baseline:
    if name not in _BASELINES:
        _BASELINES[name] = _Baseline(VARIANTS[name])
    return _BASELINES[name]


# Metrics that jump when one decision flips (argmax == target, chosen > rejected).
DISCONTINUOUS = ("sft/accuracy", "rm/accuracy", "dpo/rewards/accuracies")
# Far from a tie: the float32 drift between the compared paths (sharded, microbatched) is
# ~1e-6 on these quantities (logits, scores, log-prob sums of ~10 tokens); 1e-4 is 100x that.
TIE = 1e-4


def _tie_distance(v: Variant, batch) -> float:
    """How far the initial parameters are from a tie in the decisions behind the variant's
    discontinuous metric, on ``batch``: SFT, the target token's logit minus the best other
    logit; RM, the score differences of the compared candidates; DPO, the log-ratio difference
    ``(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))`` (of per-token averages
    for a length-normalised loss). The minimum of ``|.|`` over the counted decisions."""
    model = MODELS[v.kind]
    params = on_device(host_params(v.kind))
    if v.algo == "sft":
        logits = np.asarray(jax.jit(model.apply)(params, batch.tokens, batch.positions,
                                                 batch.attn_mask).logits, np.float64)
        pred_BxTxV, target_BxT = logits[:, :-1], np.asarray(batch.tokens)[:, 1:]
        onehot = np.arange(pred_BxTxV.shape[-1]) == target_BxT[..., None]
        gap = (np.sum(np.where(onehot, pred_BxTxV, 0.0), -1)
               - np.max(np.where(onehot, -np.inf, pred_BxTxV), -1))
        return float(np.min(np.abs(gap[np.asarray(batch.loss_mask)[:, 1:]])))
    valid = np.asarray(batch.valid, bool)
    if v.algo == "rm":
        scores = np.asarray(jax.jit(functools.partial(reward.candidate_scores, model))(
            params, batch), np.float64)
        n = scores.shape[1]
        pairs = [abs(scores[b, i] - scores[b, j]) for b in range(len(scores))
                 for i in range(n) for j in range(i + 1, n) if valid[b, i] and valid[b, j]]
        return float(min(pairs))
    logps = jax.jit(functools.partial(dpo.pair_logps, model))
    policy, lengths = (np.asarray(x, np.float64) for x in logps(params, batch))
    ref = np.asarray(logps(on_device(_ref()), batch)[0], np.float64)
    if v.cfg.loss.length_normalised:
        policy, ref = policy / np.maximum(lengths, 1), ref / np.maximum(lengths, 1)
    h = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
    return float(np.min(np.abs(h[valid.all(axis=1)])))


def _assert_metrics_close(actual: dict, expected: dict, tie_distance: float, atol=ATOL):
    """Continuous metrics within ``atol``; discontinuous ones equal, after checking that the
    inputs are far from ties (else the comparison would depend on the host's rounding)."""
    assert actual.keys() == expected.keys()
    for k in expected:
        if k in DISCONTINUOUS:
            assert tie_distance > TIE, (
                f"{k}: the inputs are {tie_distance:.2g} from a tie, so the two paths may round "
                f"to different sides on another CPU; build inputs further from ties")
        np.testing.assert_allclose(actual[k], expected[k], atol=atol, rtol=1e-5, err_msg=k)


# ---- microbatching ------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in VARIANTS if n not in MAIN])
def test_microbatched_step_equals_full_batch(name):
    v = VARIANTS[name]
    base = baseline(name)
    step = v.make(dataclasses.replace(v.cfg, num_microbatches=v.micro))
    new_state, metrics = _run(v, step, base.fresh(v), v.batch())
    # SGD with lr 1: params_M - params_1 = -(grad_M - grad_1).
    assert_tree_close(host(new_state.params), base.params, atol=ATOL)
    _assert_metrics_close(reduced(metrics), base.metrics, base.tie_distance)
    # The step really moved the parameters (the comparison is not vacuous).
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), base.params, base.params0)
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_microbatches_must_divide_the_batch():
    v = VARIANTS["sft-token"]
    step = v.make(dataclasses.replace(v.cfg, num_microbatches=3))
    with pytest.raises(ValueError, match=r"batch size 8 is not divisible by num_microbatches=3"):
        _run(v, step, _Baseline.fresh(v), v.batch())


# ---- filler rows ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MAIN)
def test_filler_rows_carry_no_loss(name):
    """4 real rows + 4 filler rows == the 4 real rows each twice (same batch shape)."""
    v = VARIANTS[name]
    base = baseline(name)
    full = v.batch() if v.algo == "sft" else pref_batch(8, 2, 12, seed=1)  # no filler yet
    duplicated = _take(full, [0, 1, 2, 3, 0, 1, 2, 3])
    padded = _filler(full, [4, 5, 6, 7])
    s_dup, m_dup = _run(v, base.step, base.fresh(v), duplicated)
    s_pad, m_pad = _run(v, base.step, base.fresh(v), padded)
    assert_tree_close(host(s_pad.params), host(s_dup.params), atol=ATOL)
    m_dup, m_pad = reduced(m_dup), reduced(m_pad)
    tie_distance = _tie_distance(v, full)
    for k in m_dup:
        if k.endswith(("/loss", "/accuracy", "/accuracies", "/margin", "/margins", "grad_norm")):
            assert k not in DISCONTINUOUS or tie_distance > TIE, (k, tie_distance)
            np.testing.assert_allclose(m_pad[k], m_dup[k], atol=ATOL, rtol=1e-5, err_msg=k)
    assert base.counter.count == 1  # same shapes: no new trace


# ---- sharding -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MAIN)
def test_sharded_microbatched_step_equals_single_device_full_batch(name):
    v = VARIANTS[name]
    base = baseline(name)
    mesh = fsdp_tensor_mesh()
    model = MODELS[v.kind]
    with jax.set_mesh(mesh):
        state = create_train_state(sharded_params(v.kind), TX, jax.random.key(1))
        batch = shard_batch(v.batch(), mesh)
        kwargs = dict(state_sharding=state_shardings(state),
                      batch_sharding=jax.tree.map(lambda x: x.sharding, batch))
        args = ()
        if v.algo == "dpo":
            kwargs["frozen_sharding"] = model.param_shardings(mesh)
            args = (jax.device_put(_ref(), model.param_shardings(mesh)),)
        step = v.make(dataclasses.replace(v.cfg, num_microbatches=v.micro), **kwargs)
        new_state, metrics = step(state, batch, *args)
    # The state stays sharded as the rule table says.
    q = new_state.params["trunk"]["blocks"]["attn"]["q"]["kernel"]
    want = model.param_shardings(mesh)["trunk"]["blocks"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == want.spec
    assert len({s.device for s in q.addressable_shards}) == 8
    assert_tree_close(host(new_state.params), base.params, atol=ATOL)
    _assert_metrics_close(reduced(metrics), base.metrics, base.tie_distance)


# ---- traces and learning --------------------------------------------------------------------

@pytest.mark.parametrize("name", MAIN)
def test_step_compiles_once_per_bucket_and_lowers_loss(name):
    v = VARIANTS[name]
    base = baseline(name)  # traced once already
    state = base.fresh(v, lr=v.learn_lr)
    batch = v.batch()
    losses = []
    for _ in range(4):
        state, metrics = _run(v, base.step, state, batch)
        losses.append(reduced(metrics)[v.loss_key])  # loss *before* this update
    assert base.counter.count == 1, "same shapes (and new state values) must not retrace"
    assert int(state.step) == 4
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.05, losses
    # A new length bucket traces once more, and only once. (``lower`` shares jit's trace cache;
    # it skips the XLA compile, which costs seconds per step on CPU.)
    longer = v.batch(16)
    for _ in range(2):
        base.step.lower(state, longer, *_frozen(v, longer))
    assert base.counter.count == 2


# ---- the DPO loss registry in the trainer ---------------------------------------------------

@pytest.mark.parametrize("loss_type", sorted(k for k, v in DPO_LOSSES.items() if not v.unpaired))
def test_dpo_trainer_gives_each_registered_loss_what_it_reads(loss_type):
    """The trainer's loss (all pairs valid) equals ``dpo_loss`` given everything - sums,
    lengths, reference log-probs - which uses what the registry entry says: a trainer that
    dropped the lengths of a length-normalised loss, or the reference of one that needs it,
    would differ."""
    from rlhf_jax.losses.dpo import dpo_loss
    spec = DPO_LOSSES[loss_type]
    cfg = dpo.DPOConfig(loss_type=loss_type, beta=0.3, gamma=0.2,
                        label_smoothing=0.1 if spec.uses_label_smoothing else 0.0)
    rng = np.random.default_rng(0)
    policy, ref = (-(rng.random((6, 2)) * 20 + 2).astype(np.float32) for _ in range(2))
    lengths = rng.integers(2, 12, size=(6, 2)).astype(np.float32)
    valid = np.ones((6, 2), bool)
    got, metrics = dpo.masked_dpo_loss(policy, lengths, ref, valid, np.float32(6.0), cfg)
    want, want_metrics = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1],
                                  beta=cfg.beta, loss_type=loss_type, gamma=cfg.gamma,
                                  label_smoothing=cfg.label_smoothing,
                                  chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert metrics.keys() == want_metrics.keys()
    assert cfg.needs_reference == spec.needs_reference


def test_reference_free_dpo_runs_no_reference_forward():
    """SimPO / ORPO steps take ``None`` for the reference (a reference forward would fail on
    it); a loss that needs the reference says so."""
    batch = _pair_batch()
    for loss_type in ("simpo", "orpo"):
        assert not DPO_LOSSES[loss_type].needs_reference
    cfg = dpo.DPOConfig(loss_type="simpo", beta=2.0, reference_shares_frozen_layers=True)
    state = _Baseline.fresh(VARIANTS["dpo-sigmoid"], lr=0.1)
    new_state, metrics = dpo.make_dpo_step(MODELS["lm"], TX, cfg)(state, batch, None)
    assert np.isfinite(reduced(metrics)["dpo/loss"])
    assert int(new_state.step) == 1
    # The precomputed path and the evaluation take None as well (traced only: no compile).
    dpo.make_dpo_step(MODELS["lm"], TX, dpo.DPOConfig(loss_type="orpo"), precomputed=True).lower(
        _Baseline.fresh(VARIANTS["dpo-sigmoid"]), batch, None)
    dpo.make_dpo_eval(MODELS["lm"], cfg).lower(on_device(host_params("lm")), None, batch)
    with pytest.raises(ValueError, match="'sigmoid' needs the reference parameters"):
        dpo.make_dpo_step(MODELS["lm"], TX, dpo.DPOConfig()).lower(
            _Baseline.fresh(VARIANTS["dpo-sigmoid"]), batch, None)


def test_dpo_config_checks_the_loss_type_against_the_registry():
    with pytest.raises(ValueError, match=re.escape(str(sorted(DPO_LOSSES)))):
        dpo.DPOConfig(loss_type="not_a_loss")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.DPOConfig(loss_type="ipo", label_smoothing=0.1)
    assert dpo.DPOConfig(loss_type="robust", label_smoothing=0.1).loss is DPO_LOSSES["robust"]
