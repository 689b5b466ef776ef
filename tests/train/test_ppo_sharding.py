"""PPO under data parallelism: the minibatch shuffle stays local to each batch shard.

The rollout batch is split over the ``data`` mesh axis. A global permutation of its rows would
move the ``[B, T, D]`` / ``[B, T]`` experience between devices on every minibatch (XLA lowers
such a gather to collectives on those shapes); ``ppo_update`` permutes within each shard
instead. The tests check the permutation (every row once per epoch, the same number of rows
from every shard in each minibatch) and the compiled HLO of a sharded iteration.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.control import KLController
from rlhf_jax.models.model import Model
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.sharding import MeshConfig, batch_sharding, make_mesh, shard_batch
from rlhf_jax.train import ppo
from rlhf_jax.train.state import (OptimizerConfig, create_sharded_train_state, make_optimizer,
                                  state_shardings, train_state_shardings)
from tests.train._tiny import EOS, PAD, TINY, host, prompts, reduced

FROZEN = dataclasses.replace(TINY, frozen_layers=1)  # Experience.frozen_hidden: [B, T, D]
B, P, R = 16, 6, 8
T, D = P + R, TINY.d_model


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 (fake) devices, have {jax.device_count()}")


# ---- the permutation -----------------------------------------------------------------------

@pytest.mark.parametrize("batch,minibatches,shards", [(16, 2, 8), (16, 4, 2), (12, 3, 1),
                                                      (8, 1, 4)])
def test_each_epoch_visits_every_row_once_with_equal_rows_per_shard(batch, minibatches, shards):
    per_shard = batch // shards
    rows = np.arange(batch)
    tree = {"row": rows, "row_x2": np.stack([rows, 2 * rows], axis=1)}
    take = jax.jit(ppo.take_minibatch)
    orders = []
    for seed in range(2):
        idx = np.asarray(ppo.minibatch_indices(jax.random.key(seed), batch, minibatches, shards))
        assert idx.shape == (minibatches, shards, batch // (minibatches * shards))
        seen = []
        for m in range(minibatches):
            mb = host(take(tree, idx[m]))
            # each minibatch takes K rows from every shard, in shard order (keeps the sharding)
            owner = mb["row"] // per_shard
            np.testing.assert_array_equal(owner, np.repeat(np.arange(shards), idx.shape[2]))
            np.testing.assert_array_equal(mb["row_x2"], np.stack([mb["row"], 2 * mb["row"]], 1))
            seen.extend(mb["row"].tolist())
        assert sorted(seen) == list(range(batch))  # every row exactly once per epoch
        orders.append(seen)
    if batch // (minibatches * shards) > 1 or minibatches > 1:
        assert orders[0] != orders[1]  # the order is random


def test_minibatches_must_divide_every_shard():
    with pytest.raises(ValueError, match=r"rollout batch 12 is not divisible by "
                                         r"num_minibatches=2 x batch shards=4"):
        ppo.minibatch_indices(jax.random.key(0), 12, 2, 4)


# ---- the compiled iteration ----------------------------------------------------------------

_COLLECTIVE = re.compile(r"=\s*(?P<type>.+?)\s+(?P<op>all-gather|all-reduce|all-to-all|"
                         r"collective-permute|reduce-scatter)(?:-start|-done)?\(")
_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")


def experience_collectives(hlo: str) -> list[str]:
    """HLO instructions that move a ``[..., T, D]`` or ``[..., T]`` tensor between devices.

    All collectives count, not only ``all-gather``: XLA lowers a cross-shard row gather to a
    masked local gather followed by an ``all-reduce`` of the gathered rows. Parameters have
    no dimension ``T`` (14 here), so their all-gathers and gradient all-reduces do not match.
    """
    hits = []
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if not match:
            continue
        for dims in _SHAPE.findall(match.group("type")):
            shape = tuple(int(d) for d in dims.split(",") if d)
            if shape[-2:] == (T, D) or shape[-1:] == (T,):
                hits.append(line.strip()[:200])
    return hits


def _setup():
    mesh = make_mesh(MeshConfig(data=8))
    policy, reward = Model(FROZEN, kind="lm_value"), Model(TINY, kind="scalar")
    tx = make_optimizer(OptimizerConfig(lr=1e-2), policy.abstract_params(), frozen_layers=1)
    cfg = ppo.PPOConfig(sampling=SamplingConfig(max_new_tokens=R, eos_token_id=EOS,
                                                pad_token_id=PAD, stop_early=False),
                        num_ppo_epochs=2, num_minibatches=2,
                        kl=KLController(kind="adaptive", init_kl_coef=0.1, target=1.0,
                                        horizon=100.0))
    return mesh, policy, reward, tx, cfg


def test_sharded_iteration_does_not_move_the_experience_between_devices():
    mesh, policy, reward, tx, cfg = _setup()
    with jax.set_mesh(mesh):
        param_sharding = policy.param_shardings(mesh)
        params = policy.init_sharded(jax.random.key(0), mesh)
        reward_params = reward.init_sharded(jax.random.key(1), mesh)
        train = create_sharded_train_state(params, tx, jax.random.key(2), mesh, param_sharding)
        sharding = ppo.ppo_state_shardings(
            train_state_shardings(param_sharding, tx, policy.abstract_params(), mesh), mesh)
        state = jax.device_put(ppo.init_ppo_state(train, cfg.kl, jax.random.key(3)), sharding)
        tokens, mask = prompts(B, P, seed=1)
        batch = shard_batch({"tokens": tokens, "mask": mask}, mesh)
        fn = ppo.make_ppo_iteration(
            policy_model=policy, reward_model=reward, policy_tx=tx, cfg=cfg,
            state_sharding=sharding, prompt_sharding=batch_sharding(mesh, 2),
            frozen_shardings=(param_sharding, reward.param_shardings(mesh)))
        args = (state, batch["tokens"], batch["mask"], params, reward_params)
        compiled = fn.lower(*args).compile()
        hits = experience_collectives(compiled.as_text())
        assert not hits, "\n".join(hits)
        new_state, metrics = compiled(*args)
    m = reduced(metrics)
    assert all(np.isfinite(v) for v in m.values()), m
    assert int(new_state.policy.step) == cfg.num_ppo_epochs * cfg.num_minibatches
    assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, new_state.policy.params,
                                     param_sharding))
    assert state_shardings(new_state.kl) == sharding.kl


def test_a_global_shuffle_would_move_the_experience():
    """The control: with one shuffle group over the 8-way sharded batch, the same check finds
    the experience moving between devices (so the check above can fail)."""
    mesh, policy, _, tx, cfg = _setup()

    def sds(*shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))

    exp = ppo.Experience(
        tokens=sds(B, T, dtype=jnp.int32), attn_mask=sds(B, T, dtype=bool),
        positions=sds(B, T, dtype=jnp.int32), response_mask=sds(B, R, dtype=bool),
        old_logp=sds(B, R), old_values=sds(B, R), ref_logp=sds(B, R), scores=sds(B),
        rewards=sds(B, R), advantages=sds(B, R), returns=sds(B, R), frozen_hidden=sds(B, T, D))
    with jax.set_mesh(mesh):
        params = policy.init_sharded(jax.random.key(0), mesh)
        state = ppo.init_ppo_state(
            create_sharded_train_state(params, tx, jax.random.key(2), mesh,
                                       policy.param_shardings(mesh)), cfg.kl, jax.random.key(3))
        update = jax.jit(lambda s, e: ppo.ppo_update(s, e, policy_model=policy, value_model=None,
                                                     policy_tx=tx, value_tx=None, cfg=cfg,
                                                     batch_shards=1))
        hlo = update.lower(state, exp).compile().as_text()
    assert experience_collectives(hlo)
