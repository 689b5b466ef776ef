"""PPO: the fused iteration, the staged iteration, the KL controller and learning a reward.

One configuration (1 epoch, 1 minibatch, adaptive KL, temperature-1 sampling of 8 tokens) is
compiled once fused and once staged and shared by the tests (a PPO compile costs several
seconds on CPU); ``value_model="separate"`` and the 8-device run compile their own.

Paths that differ only in float rounding (sharded vs one device, fused vs staged) are compared
from a *uniform* initial policy (its LM head is zero, so every logit is exactly 0 whatever the
rounding): both paths then sample bit-identical rollouts from the same key, and discontinuous
rollout statistics (lengths, EOS shares) agree by construction. Clip fractions are never
compared across paths (the value clip of the first minibatch sits exactly at its tie).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.control import KLController
from rlhf_jax.models.model import Model
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.sharding import batch_sharding, shard_batch
from rlhf_jax.train import ppo
from rlhf_jax.train.common import sequence_scores
from rlhf_jax.train.state import (OptimizerConfig, create_sharded_train_state, create_train_state,
                                  make_optimizer, state_shardings)
from rlhf_jax.types import positions_from_mask
from tests.train._tiny import (EOS, PAD, TINY, TraceCounter, assert_tree_close, fsdp_tensor_mesh,
                               host, host_params, on_device, perturbed, prompts, reduced)

POLICY = Model(TINY, kind="lm_value")
REWARD = Model(TINY, kind="scalar")
OPT = OptimizerConfig(lr=3e-2, eps=1e-3, max_grad_norm=1.0)
TX = make_optimizer(OPT, POLICY.abstract_params())
CFG = ppo.PPOConfig(
    sampling=SamplingConfig(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD),
    num_ppo_epochs=1, num_minibatches=1,
    kl=KLController(kind="adaptive", init_kl_coef=0.05, target=1.0, horizon=80.0))
PROMPTS, PROMPT_MASK = prompts(8, 6, seed=0)


@functools.cache
def reward_params():
    """The reward model: the policy's trunk with its scalar head, perturbed."""
    return perturbed(host_params("scalar"), scale=0.1, seed=3)

X = 7  # the rewarded token of the learning test


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 (fake) devices, have {jax.device_count()}")


@functools.cache
def uniform_params():
    """The policy with a zero LM head: every logit is exactly 0 (a uniform policy), so sampling
    from it does not depend on float rounding (the value head and trunk are untouched)."""
    params = dict(host_params("lm_value"))
    params["lm_head"] = jax.tree.map(np.zeros_like, params["lm_head"])
    return params


def _comparable(metrics: dict) -> dict:
    """The metrics that are continuous in the parameters (no clip fractions)."""
    return {k: v for k, v in metrics.items() if "clipfrac" not in k}


def fresh_state(params=None, seed: int = 5) -> ppo.PPOState:
    params = on_device(host_params("lm_value") if params is None else params)
    return ppo.init_ppo_state(create_train_state(params, TX, jax.random.key(seed)), CFG.kl,
                              jax.random.key(seed + 1))


class _Fused:
    """The fused iteration of ``CFG`` on one device, traced through a counter, and the result
    of its first iteration from the uniform policy with reference == policy."""

    def __init__(self):
        self.counter = TraceCounter(ppo.ppo_iteration)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ppo, "ppo_iteration", self.counter)
            self.fn = ppo.make_ppo_iteration(policy_model=POLICY, reward_model=REWARD,
                                             policy_tx=TX, cfg=CFG)
        state, metrics = self(fresh_state(uniform_params()), uniform_params())
        self.state1 = host(state)
        self.metrics1 = reduced(metrics)

    def __call__(self, state, ref):
        return self.fn(state, PROMPTS, PROMPT_MASK, on_device(ref), on_device(reward_params()))


_CACHE: dict = {}


def fused() -> _Fused:
    if "fused" not in _CACHE:
        _CACHE["fused"] = _Fused()
    return _CACHE["fused"]


def staged() -> ppo.PPOStages:
    if "staged" not in _CACHE:
        _CACHE["staged"] = ppo.PPOStages(policy_model=POLICY, policy_tx=TX, cfg=CFG)
    return _CACHE["staged"]


def _finite(metrics: dict):
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    assert not bad, bad


# ---- the first update ----------------------------------------------------------------------

def test_first_minibatch_has_ratio_one_and_no_clipping():
    f = fused()
    m = f.metrics1
    _finite(m)
    # 1 epoch x 1 minibatch: the only update is the first, where the policy IS the rollout policy.
    assert m["ppo/policy/clipfrac"] == 0.0
    assert abs(m["ppo/policy/ratio"] - 1.0) < 1e-6
    assert abs(m["ppo/policy/approxkl"]) < 1e-9
    assert abs(m["objective/kl"]) < 1e-6  # reference == policy
    assert int(f.state1.policy.step) == 1
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), f.state1.policy.params,
                         uniform_params())
    assert max(jax.tree.leaves(moved)) > 1e-4


# ---- KL controller ---------------------------------------------------------------------------

def test_adaptive_kl_coef_moves_toward_target_and_compiles_once():
    f = fused()
    # A reference far from the policy: KL per sequence far above the target -> beta grows.
    far_ref = perturbed(host_params("lm_value"), scale=1.0, seed=11)
    state, coefs, kls = fresh_state(), [], []
    for _ in range(3):
        state, metrics = f(state, far_ref)
        m = reduced(metrics)
        _finite(m)
        coefs.append(m["objective/kl_coef"])  # the coefficient this iteration used
        kls.append(m["objective/kl"])
    coefs.append(float(state.kl.kl_coef))
    assert coefs[0] == pytest.approx(CFG.kl.init_kl_coef)
    assert min(kls) > CFG.kl.target, kls
    assert all(b > a for a, b in zip(coefs, coefs[1:])), coefs
    # Reference == policy: KL 0, below the target -> beta shrinks.
    state, metrics = f(fresh_state(), host_params("lm_value"))
    assert float(state.kl.kl_coef) < CFG.kl.init_kl_coef
    # Five more calls with the same shapes (and new state values): still one trace.
    assert f.counter.count == 1


# ---- sharded == single device ----------------------------------------------------------------

def test_sharded_ppo_iteration_equals_single_device():
    """(fsdp=4, tensor=2) with explicit shardings vs one device, from the uniform policy: the
    same typed key draws the same rollout on both (threefry draws do not depend on the
    sharding, and every logit is exactly 0), so only rounding differs downstream."""
    f = fused()
    mesh = fsdp_tensor_mesh()
    with jax.set_mesh(mesh):
        param_sharding = POLICY.param_shardings(mesh)
        params = jax.device_put(uniform_params(), param_sharding)
        policy = create_sharded_train_state(params, TX, jax.random.key(5), mesh, param_sharding)
        sharding = ppo.ppo_state_shardings(state_shardings(policy), mesh)
        state = jax.device_put(ppo.init_ppo_state(policy, CFG.kl, jax.random.key(6)), sharding)
        batch = shard_batch({"tokens": PROMPTS, "mask": PROMPT_MASK}, mesh)
        fn = ppo.make_ppo_iteration(
            policy_model=POLICY, reward_model=REWARD, policy_tx=TX, cfg=CFG,
            state_sharding=sharding, prompt_sharding=batch_sharding(mesh, 2),
            frozen_shardings=(POLICY.param_shardings(mesh), REWARD.param_shardings(mesh)))
        sharded_reward = jax.device_put(reward_params(), REWARD.param_shardings(mesh))
        new_state, metrics = fn(state, batch["tokens"], batch["mask"], params, sharded_reward)
    m = reduced(metrics)
    assert m.keys() == f.metrics1.keys()
    for k in ("rollout/response_length", "rollout/no_eos_share"):
        assert m[k] == f.metrics1[k], k  # same rollout by construction (uniform policy)
    for k, v in _comparable(f.metrics1).items():
        np.testing.assert_allclose(m[k], v, atol=1e-5, rtol=1e-4, err_msg=k)
    assert_tree_close(host(new_state.policy.params), f.state1.policy.params, atol=1e-5)
    q = new_state.policy.params["trunk"]["blocks"]["attn"]["q"]["kernel"]
    assert len({s.device for s in q.addressable_shards}) == 8
    assert q.sharding == params["trunk"]["blocks"]["attn"]["q"]["kernel"].sharding


# ---- staged == fused -------------------------------------------------------------------------

_score = jax.jit(lambda params, tokens, positions, mask: sequence_scores(REWARD, params, tokens,
                                                                         positions, mask))


def reward_model_fn(prompt_tokens, response, response_mask):
    """Host reward function that reproduces the fused iteration's reward model."""
    tokens = np.concatenate([prompt_tokens, response], axis=1)
    mask = np.concatenate([PROMPT_MASK, response_mask], axis=1)
    return np.asarray(_score(on_device(reward_params()), tokens, positions_from_mask(mask), mask))


def test_staged_iteration_equals_fused():
    """Both sample the uniform policy with the same key: the same rollout by construction."""
    f = fused()
    state, metrics = staged().iteration(fresh_state(uniform_params()), PROMPTS, PROMPT_MASK,
                                        on_device(uniform_params()), reward_model_fn)
    assert_tree_close(host(state.policy.params), f.state1.policy.params, atol=1e-5)
    m = reduced(metrics)
    assert m.keys() == f.metrics1.keys()
    for k in ("rollout/response_length", "rollout/no_eos_share"):
        assert m[k] == f.metrics1[k], k
    for k, v in _comparable(f.metrics1).items():
        np.testing.assert_allclose(m[k], v, atol=1e-5, rtol=1e-4, err_msg=k)


def test_staged_reward_fn_must_return_one_score_per_row():
    with pytest.raises(ValueError, match=r"reward_fn returned shape \(3,\), expected \(8,\)"):
        staged().iteration(fresh_state(), PROMPTS, PROMPT_MASK,
                           on_device(host_params("lm_value")), lambda p, r, m: np.zeros(3))


# ---- learning a reward -----------------------------------------------------------------------

# p(X) at fixed contexts: each prompt followed by 8 fixed random tokens; the distributions
# that predict response positions P .. P+R-1.
_CONTEXT = np.concatenate([PROMPTS, np.random.default_rng(9).integers(3, 64, (8, 8))], 1)
_CONTEXT_MASK = np.concatenate([PROMPT_MASK, np.ones((8, 8), bool)], 1)


@jax.jit
def _prob_of_x(params):
    out = POLICY.apply(params, _CONTEXT, positions_from_mask(_CONTEXT_MASK), _CONTEXT_MASK)
    probs = jax.nn.softmax(out.logits[:, PROMPTS.shape[1] - 1:-1], axis=-1)
    return jnp.mean(probs[..., X])


def count_x(prompt_tokens, response, response_mask):
    """Reward: how often the response contains token X."""
    return np.sum((response == X) & response_mask, axis=-1).astype(np.float32)


def test_rewarding_a_token_raises_its_probability():
    params0 = host_params("lm_value")
    state = fresh_state()
    before = float(_prob_of_x(on_device(params0)))
    scores, kls = [], []
    for _ in range(10):
        state, metrics = staged().iteration(state, PROMPTS, PROMPT_MASK, on_device(params0),
                                            count_x)
        m = reduced(metrics)
        scores.append(m["objective/score"])
        kls.append(m["objective/kl"])
    after = float(_prob_of_x(state.policy.params))
    assert np.all(np.isfinite(kls)), kls
    assert after > 5 * before, (before, after, scores)
    assert np.mean(scores[-3:]) > np.mean(scores[:3]), scores


# ---- separate value model --------------------------------------------------------------------

def test_separate_value_model_runs_two_iterations_without_a_policy_value_head():
    cfg = dataclasses.replace(CFG, value_model="separate")
    lm, value_model = Model(TINY), Model(TINY, kind="scalar")  # the policy has no value head
    policy_params, value_params = host_params("lm"), host_params("scalar")
    assert "value_head" not in policy_params
    value_tx = make_optimizer(OPT, value_model.abstract_params())
    policy_tx = make_optimizer(OPT, lm.abstract_params())
    state = ppo.init_ppo_state(
        create_train_state(on_device(policy_params), policy_tx, jax.random.key(5)), cfg.kl,
        jax.random.key(6),
        value=create_train_state(on_device(value_params), value_tx, jax.random.key(7)))
    fn = ppo.make_ppo_iteration(policy_model=lm, reward_model=REWARD, policy_tx=policy_tx, cfg=cfg,
                                value_model=value_model, value_tx=value_tx)
    snapshots = [host(state.value.params)]
    for _ in range(2):
        state, metrics = fn(state, PROMPTS, PROMPT_MASK, on_device(policy_params),
                            on_device(reward_params()))
        m = reduced(metrics)
        _finite(m)
        assert m["ppo/val/loss"] > 0
        snapshots.append(host(state.value.params))
    assert int(state.policy.step) == 2 and int(state.value.step) == 2
    for before, after in zip(snapshots, snapshots[1:]):  # the value model moves every iteration
        moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), after, before)
        assert max(jax.tree.leaves(moved)) > 1e-4
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state.policy.params,
                         policy_params)
    assert max(jax.tree.leaves(moved)) > 1e-4
    assert "value_head" not in state.policy.params
    # The value model is its own tree: the trunk it trains is not the policy's.
    assert not np.allclose(np.asarray(state.value.params["trunk"]["embed"]),
                           np.asarray(state.policy.params["trunk"]["embed"]))


def test_value_model_choice_is_checked():
    lm, scalar = Model(TINY), Model(TINY, kind="scalar")
    with pytest.raises(ValueError, match="'shared' needs an 'lm_value' policy"):
        ppo.make_ppo_iteration(policy_model=lm, reward_model=REWARD, policy_tx=TX, cfg=CFG)
    separate = dataclasses.replace(CFG, value_model="separate")
    with pytest.raises(ValueError, match="'separate' needs a 'scalar' value_model, got None"):
        ppo.make_ppo_iteration(policy_model=lm, reward_model=REWARD, policy_tx=TX, cfg=separate)
    with pytest.raises(ValueError, match="'separate' needs a 'scalar' value_model, got 'lm'"):
        ppo.PPOStages(policy_model=lm, policy_tx=TX, cfg=separate, value_model=lm)
    with pytest.raises(ValueError, match="policy must be an 'lm' or 'lm_value' model"):
        ppo.PPOStages(policy_model=scalar, policy_tx=TX, cfg=separate, value_model=scalar)


# ---- the constrained policy (min_new_tokens) ------------------------------------------------

def test_policy_forward_matches_sampler_logprobs_under_min_new_tokens():
    """The training forward sees the policy the sampler draws from: temperature and the EOS
    suppression of the first ``min_new_tokens`` slots; entropy gradients stay finite there."""
    from rlhf_jax.rollout.sampler import sample
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.7, eos_token_id=(EOS, 5), pad_token_id=PAD,
                         min_new_tokens=4)
    params = host_params("lm_value")
    out = jax.jit(sample, static_argnames=("model", "cfg"))(
        POLICY, params, PROMPTS, PROMPT_MASK, jax.random.key(3), cfg)
    assert not np.any(np.isin(np.asarray(out.response[:, :4]), [EOS, 5]))
    fwd = jax.jit(ppo.policy_forward, static_argnames=("model", "prompt_len", "sampling"))
    logp, entropy, _ = fwd(POLICY, params, out.tokens, out.positions, out.attn_mask,
                           prompt_len=PROMPTS.shape[1], sampling=cfg)
    m = np.asarray(out.response_mask)
    np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(out.logprobs)[m], atol=1e-5)
    # unconstrained, the same tokens are less likely in slots 0..3 (EOS mass is renormalised away)
    free, _, _ = fwd(POLICY, params, out.tokens, out.positions, out.attn_mask,
                     prompt_len=PROMPTS.shape[1], sampling=dataclasses.replace(cfg, min_new_tokens=0))
    assert np.all(np.asarray(free)[:, :4] < np.asarray(logp)[:, :4])
    np.testing.assert_allclose(np.asarray(free)[:, 4:][m[:, 4:]], np.asarray(logp)[:, 4:][m[:, 4:]],
                               atol=1e-6)
    grads = jax.grad(lambda p: jnp.sum(fwd(POLICY, p, out.tokens, out.positions, out.attn_mask,
                                           prompt_len=PROMPTS.shape[1], sampling=cfg)[1]))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
