"""Train state, optimizer configuration and frozen layers."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from rlhf_jax.models.model import Model
from rlhf_jax.train.sft import make_sft_step
from rlhf_jax.train.state import (OptimizerConfig, create_train_state, learning_rate_schedule,
                                  make_optimizer)
from tests.train._tiny import (TINY, fsdp_tensor_mesh, host_params, on_device, sft_batch,
                               sharded_params)


def _leaves_with_paths(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


@functools.cache
def _frozen_sft_step():
    """One SFT step (AdamW, weight decay) of a ``frozen_layers=1`` model, recording what the
    caller's params and the donated state look like afterwards."""
    model = Model(dataclasses.replace(TINY, frozen_layers=1))
    params = on_device(host_params("lm"))
    before = jax.tree.map(np.array, params)
    tx = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.1), params, frozen_layers=1)
    state = create_train_state(params, tx, jax.random.key(0))
    shared = [path for (path, a), (_, b) in zip(_leaves_with_paths(state.params),
                                                _leaves_with_paths(params))
              if a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()]
    old_params = state.params
    state, _ = make_sft_step(model, tx)(state, sft_batch())
    return dict(params=params, before=before, after=jax.tree.map(np.asarray, state.params),
                shared=shared, donated=[x.is_deleted() for x in jax.tree.leaves(old_params)])


def test_create_train_state_copies_params_and_the_step_donates_only_the_copy():
    r = _frozen_sft_step()
    assert r["shared"] == [], "the state shares buffers with the caller's params"
    assert all(r["donated"]), "the step did not donate its state"
    assert not any(x.is_deleted() for x in jax.tree.leaves(r["params"]))
    for (path, a), (_, b) in zip(_leaves_with_paths(r["params"]), _leaves_with_paths(r["before"])):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=path)


def test_frozen_layers_keep_embeddings_and_lower_blocks_bit_identical():
    """``ModelConfig(frozen_layers=1)`` + ``make_optimizer(frozen_layers=1)`` with weight decay:
    embeddings and block 0 do not move at all; block 1, the final norm and the head do."""
    r = _frozen_sft_step()
    before, after = r["before"], r["after"]
    np.testing.assert_array_equal(after["trunk"]["embed"], before["trunk"]["embed"])
    old_blocks = dict(_leaves_with_paths(before["trunk"]["blocks"]))
    for path, new in _leaves_with_paths(after["trunk"]["blocks"]):
        old = old_blocks[path]
        np.testing.assert_array_equal(new[0], old[0], err_msg=f"block 0 {path}")
        assert np.abs(new[1] - old[1]).max() > 1e-6, f"block 1 {path} did not train"
    assert np.abs(after["lm_head"]["kernel"] - before["lm_head"]["kernel"]).max() > 1e-5
    final_norm = lambda tree: tree["trunk"]["final_norm"]["scale"]
    assert np.abs(final_norm(after) - final_norm(before)).max() > 0


def test_sharded_state_keeps_parameter_shardings():
    """The copy and the AdamW moments keep each parameter's (fsdp, tensor) sharding."""
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 (fake) devices, have {jax.device_count()}")
    mesh = fsdp_tensor_mesh()
    params = sharded_params("lm")
    with jax.set_mesh(mesh):
        state = create_train_state(params, make_optimizer(OptimizerConfig(), params),
                                   jax.random.key(0))
    adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
                if hasattr(s, "mu"))
    for tree in (state.params, adam.mu, adam.nu):
        for (path, x), (_, p) in zip(_leaves_with_paths(tree), _leaves_with_paths(params)):
            assert x.sharding.is_equivalent_to(p.sharding, x.ndim), path


def test_optimizer_config_validation_names_the_numbers():
    with pytest.raises(ValueError, match=r"lr must be > 0, got 0"):
        OptimizerConfig(lr=0)
    with pytest.raises(ValueError, match=r"warmup_steps=-1 must be >= 0 and total_steps=10"):
        OptimizerConfig(warmup_steps=-1, total_steps=10)
    with pytest.raises(ValueError, match=r"warmup_steps=5 must be >= 0 and total_steps=0"):
        OptimizerConfig(warmup_steps=5, total_steps=0)
    with pytest.raises(ValueError, match=r"warmup_steps=20 exceeds total_steps=10"):
        OptimizerConfig(schedule="cosine", warmup_steps=20, total_steps=10)
    OptimizerConfig(schedule="constant", warmup_steps=20, total_steps=10)  # no decay: allowed


@pytest.mark.parametrize("schedule,end", [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)])
def test_learning_rate_schedule_warms_up_then_decays(schedule, end):
    cfg = OptimizerConfig(lr=2.0, warmup_steps=4, total_steps=12, schedule=schedule,
                          end_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(2)) == pytest.approx(1.0)
    assert float(lr(4)) == pytest.approx(2.0)
    assert float(lr(12)) == pytest.approx(2.0 * end)
    if schedule != "constant":
        assert 2.0 * end < float(lr(8)) < 2.0
