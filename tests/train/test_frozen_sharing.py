"""Frozen lower layers computed once and shared: ``Model.frozen_hidden``, ``frozen_part_equal``,
DPO and PPO with ``reference_shares_frozen_layers``.

The references are computations that share nothing: the plain forward, the DPO step without
sharing, and a PPO run of a model with ``frozen_layers=0`` whose optimizer freezes the same
layers (``make_optimizer(frozen_layers=1)``): it back-propagates into the lower layers and
masks those gradients, so it moves exactly the same parameters by the same amounts while
recomputing every layer in every forward.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from rlhf_jax.models.model import Model
from rlhf_jax.train import dpo, ppo
from rlhf_jax.train.state import (OptimizerConfig, create_train_state, frozen_part_equal,
                                  make_optimizer)
from rlhf_jax.types import positions_from_mask
from rlhf_jax.control import KLController
from rlhf_jax.rollout.sampler import SamplingConfig
from tests.train._tiny import (EOS, PAD, TINY, assert_tree_close, host, host_params, on_device,
                               perturbed, pref_batch, prompts, reduced, sharded_params)

FROZEN = dataclasses.replace(TINY, frozen_layers=1)  # TINY has 2 layers
REWARD = Model(TINY, kind="scalar")
PPO_CFG = ppo.PPOConfig(
    sampling=SamplingConfig(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD),
    num_ppo_epochs=2, num_minibatches=2,
    kl=KLController(kind="adaptive", init_kl_coef=0.05, target=1.0, horizon=80.0))


@pytest.mark.parametrize("frozen_layers", [1, 2])
@pytest.mark.parametrize("kind", ["lm_value", "scalar"])
def test_apply_from_frozen_hidden_equals_full_forward(frozen_layers, kind):
    model = Model(dataclasses.replace(TINY, frozen_layers=frozen_layers), kind=kind)
    params = on_device(host_params(kind))
    tokens, mask = prompts(4, 10, seed=1)
    positions = positions_from_mask(mask)
    full = jax.jit(model.apply)(params, tokens, positions, mask)
    hidden = jax.jit(model.frozen_hidden)(params, tokens, positions, mask)
    assert hidden.shape == (4, 10, TINY.d_model)
    split = jax.jit(lambda p, h: model.apply(p, tokens, positions, mask, frozen_hidden=h))(
        params, hidden)
    np.testing.assert_allclose(np.asarray(split.hidden), np.asarray(full.hidden), atol=1e-6)
    if kind == "lm_value":
        np.testing.assert_allclose(np.asarray(split.logits), np.asarray(full.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(split.values), np.asarray(full.values), atol=1e-6)


def test_frozen_hidden_needs_frozen_layers_and_no_cache():
    tokens, mask = prompts(2, 4)
    positions = positions_from_mask(mask)
    with pytest.raises(ValueError, match="frozen_layers > 0"):
        Model(TINY).frozen_hidden(on_device(host_params("lm")), tokens, positions, mask)
    model = Model(FROZEN)
    params = on_device(host_params("lm"))
    hidden = model.frozen_hidden(params, tokens, positions, mask)
    with pytest.raises(ValueError, match="no KV cache"):
        model.apply(params, tokens, positions, mask, model.init_cache(2, 8), frozen_hidden=hidden)


def test_frozen_part_equal():
    params = host_params("lm")
    other = jax.tree.map(np.copy, params)
    assert frozen_part_equal(params, other, 1)
    assert not frozen_part_equal(params, other, 0)  # nothing frozen, nothing to share

    def edit(tree, fn):
        out = jax.tree.map(np.copy, tree)
        fn(out)
        return out

    def bump_block(layer):
        def fn(tree):
            kernel = tree["trunk"]["blocks"]["mlp"]["up"]["kernel"]
            kernel[layer] += 1.0
        return fn

    upper_moved = edit(params, bump_block(1))
    assert frozen_part_equal(params, upper_moved, 1)       # block 1 trains
    assert not frozen_part_equal(params, upper_moved, 2)   # ... unless frozen too
    assert not frozen_part_equal(params, edit(params, bump_block(0)), 1)
    assert not frozen_part_equal(
        params, edit(params, lambda t: t["trunk"]["embed"].__iadd__(1.0)), 1)
    assert frozen_part_equal(params, edit(params, lambda t: t["trunk"]["final_norm"]["scale"]
                                          .__iadd__(1.0)), 1)
    # placements do not matter: one copy on a device, the other sharded over the 8-device mesh
    assert frozen_part_equal(on_device(params), sharded_params("lm"), 1)
    with pytest.raises(ValueError, match="structure"):
        frozen_part_equal(params, {"trunk": params["trunk"]}, 1)


def _dpo_run(cfg: dpo.DPOConfig, steps: int = 2):
    model = Model(FROZEN)
    params = host_params("lm")
    # Adam's eps well above the gradients' rounding: with the default 1e-8 the update of an
    # element with a near-zero gradient is ~lr * sign(g), so rounding differences between the
    # two paths move such parameters by up to lr (seen on another CPU: 1.4e-5 at lr 1e-2).
    tx = make_optimizer(OptimizerConfig(lr=1e-2, eps=1e-3), params, frozen_layers=1)
    state = create_train_state(on_device(params), tx, jax.random.key(0))
    step = dpo.make_dpo_step(model, tx, cfg)
    ref = on_device(jax.tree.map(np.copy, params))
    out = []
    for i in range(steps):
        state, metrics = step(state, on_device(pref_batch(8, seed=i)), ref)
        out.append(reduced(metrics))
    evaluated = reduced(dpo.make_dpo_eval(model, cfg)(state.params, ref,
                                                      on_device(pref_batch(8, seed=9))))
    return host(state.params), out, evaluated


# A count of ``chosen > rejected``: at the first step the policy *is* the reference, every
# implicit reward is 0 up to rounding, and the two paths round to different sides of the tie
# on different CPUs. The margins (continuous) are compared instead.
DISCONTINUOUS = {"dpo/rewards/accuracies"}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_sharing_frozen_layers_with_the_reference_changes_nothing(loss_type):
    base = dpo.DPOConfig(loss_type=loss_type)
    params, metrics, evaluated = _dpo_run(base)
    for shared in (dataclasses.replace(base, reference_shares_frozen_layers=True),
                   dataclasses.replace(base, reference_shares_frozen_layers=True,
                                       num_microbatches=2)):
        p, m, e = _dpo_run(shared)
        assert_tree_close(p, params, atol=1e-5)
        for got, want in zip(m + [e], metrics + [evaluated]):
            assert got.keys() == want.keys()
            for k in want.keys() - DISCONTINUOUS:
                assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k
    # the second step ran with a moved policy: the reference's log-probs came from the shared
    # frozen layers and its own upper block, not the policy's (its rewards are not zero)
    assert abs(metrics[1]["dpo/rewards/margins"]) > 0


def _ppo_run(model: Model, cfg: ppo.PPOConfig, iterations: int = 2):
    params = host_params("lm_value")
    tx = make_optimizer(OptimizerConfig(lr=3e-2, eps=1e-3, max_grad_norm=1.0), params,
                        frozen_layers=1)
    state = ppo.init_ppo_state(create_train_state(on_device(params), tx, jax.random.key(5)),
                               cfg.kl, jax.random.key(6))
    fn = ppo.make_ppo_iteration(policy_model=model, reward_model=REWARD, policy_tx=tx, cfg=cfg)
    tokens, mask = prompts(8, 6, seed=0)
    ref = on_device(jax.tree.map(np.copy, params))
    reward = on_device(perturbed(host_params("scalar"), scale=0.1, seed=3))
    out = []
    for _ in range(iterations):
        state, metrics = fn(state, tokens, mask, ref, reward)
        out.append(reduced(metrics))
    return host(state.policy.params), out


def test_ppo_with_cached_frozen_layers_equals_a_run_that_recomputes_them():
    cfg = PPO_CFG
    # reference run: no frozen layers in the model (every forward runs every layer; gradients
    # reach block 0 and the embeddings and are masked by the optimizer)
    expected, expected_metrics = _ppo_run(Model(TINY, kind="lm_value"), cfg)
    cached, metrics = _ppo_run(Model(FROZEN, kind="lm_value"),
                               dataclasses.replace(cfg, reference_shares_frozen_layers=True))
    assert_tree_close(cached, expected, atol=2e-5)
    # the raw gradient norm includes the masked lower-layer gradients in the reference run
    skip = {"ppo/policy/grad_norm"}
    # Fractions of tokens whose ratio (value) left the clip range: a fifth of them do with this
    # learning rate, so one may sit within rounding of the boundary and flip between the two
    # paths on another CPU (one token moves the fraction by ~0.01). Loose check only.
    clipfracs = {"ppo/policy/clipfrac", "ppo/val/clipfrac"}
    for got, want in zip(metrics, expected_metrics):
        for k in want.keys() - skip - clipfracs:
            assert got[k] == pytest.approx(want[k], rel=1e-3, abs=1e-4), k
        for k in clipfracs:
            assert got[k] == pytest.approx(want[k], abs=0.05), k
    assert metrics[1]["objective/kl"] > 0  # the second rollout's reference differs from the policy
