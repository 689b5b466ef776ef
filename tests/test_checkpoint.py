"""Checkpoint round trips, sharded restore, retention, mismatch errors, preemption guard."""

import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.checkpoint import (Checkpointer, NonFiniteLossError, PreemptionGuard, abstract_like,
                                 check_finite, config_to_dict, model_fingerprint, with_shardings)
from rlhf_jax.config import ModelConfig
from rlhf_jax.control import KLController
from rlhf_jax.models.model import Model
from rlhf_jax.sharding import MeshConfig, make_mesh, replicated
from rlhf_jax.train.ppo import PPOState
from rlhf_jax.train.state import OptimizerConfig, TrainState, create_train_state, make_optimizer

TINY = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, mlp_dim=32)


def _leaves_equal(a, b):
    """Bit-identical comparison of two pytrees (typed keys compared by their key data)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert y.dtype == x.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@functools.lru_cache(maxsize=None)
def _trained_state(model=None, steps=2):
    """A single-device TrainState of ``model``'s parameter tree with non-trivial AdamW moments
    and a typed key. Parameters are random NumPy values (compiling the NNX init takes ~15 s on
    CPU; the sharded test below does use ``init_sharded``)."""
    model = model or Model(TINY)
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda s: jnp.asarray(rs.standard_normal(s.shape), s.dtype),
                          model.abstract_params())
    tx = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.1), params)

    @jax.jit
    def build(params):
        state = create_train_state(params, tx, jax.random.key(7))
        for i in range(steps):
            grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01 * (i + 1)), state.params)
            updates, opt = tx.update(grads, state.opt_state, state.params)
            state = state.replace(step=state.step + 1,
                                  params=optax.apply_updates(state.params, updates), opt_state=opt)
        return state

    return build(params), tx


def test_round_trip_bit_identical_with_meta(tmp_path):
    state, _ = _trained_state()
    meta = {"config": config_to_dict(TINY), "data_position": 123,
            "fingerprint": model_fingerprint(Model(TINY))}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(2, state, meta)
        assert ckpt.latest_step() == 2
        restored, meta2 = ckpt.restore(abstract_like(state))
    assert isinstance(restored, TrainState)
    _leaves_equal(state, restored)
    assert meta2 == meta
    assert meta2["config"]["d_model"] == 16
    # The typed key is usable and equal, not raw uint32 data.
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.uniform(restored.rng, (3,)),
                                  jax.random.uniform(state.rng, (3,)))


def test_nested_state_with_none_and_key_impl(tmp_path):
    """A PPOState (value=None, KL controller NamedTuple) in a dict with an rbg key array and
    a NumPy leaf."""
    state, _ = _trained_state()
    ppo = PPOState(policy=state, value=None, kl=KLController(init_kl_coef=0.05).init(),
                   rng=jax.random.key(11))
    tree = {"ppo": ppo, "value": None, "kl": {"coef": jnp.float32(0.1)},
            "keys": jax.random.split(jax.random.key(3, impl="rbg"), 4),
            "np": np.arange(3, dtype=np.int64)}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(5, tree, {})
    restored, _ = ckpt.restore(abstract_like(tree))
    assert restored["value"] is None and restored["ppo"].value is None
    assert isinstance(restored["ppo"], PPOState)
    assert restored["keys"].dtype == tree["keys"].dtype and restored["keys"].shape == (4,)
    _leaves_equal({k: v for k, v in tree.items() if k != "np"},
                  {k: v for k, v in restored.items() if k != "np"})
    np.testing.assert_array_equal(np.asarray(restored["np"]), tree["np"])
    ckpt.close()


def test_restore_into_target_shardings(tmp_path):
    """Saved from one device, restored straight onto an fsdp=4 x tensor=2 mesh."""
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    model = Model(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, mlp_dim=32))
    sharded_params = model.init_sharded(jax.random.key(0), mesh)
    tx = make_optimizer(OptimizerConfig(lr=1e-3), sharded_params)
    # Target: params and their Adam moments sharded like the params, the rest replicated.
    p_shard = model.param_shardings(mesh)
    abstract = jax.eval_shape(lambda p: create_train_state(p, tx, jax.random.key(1)),
                              model.abstract_params())
    shardings = TrainState(
        step=replicated(mesh), params=p_shard,
        opt_state=optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, p_shard,
                                        transform_non_params=lambda _: replicated(mesh)),
        rng=replicated(mesh))
    target = with_shardings(abstract, shardings)

    state = create_train_state(jax.device_get(sharded_params), tx, jax.random.key(1))
    state = jax.device_put(state, jax.devices()[0])
    ckpt = Checkpointer(tmp_path)
    ckpt.save(0, state, {})
    restored, _ = ckpt.restore(target)
    _leaves_equal(state, restored)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
    emb = restored.params["trunk"]["embed"]
    assert emb.sharding.spec == p_shard["trunk"]["embed"].spec
    assert len(emb.addressable_shards) == 8
    assert emb.addressable_shards[0].data.shape != emb.shape  # really split
    ckpt.close()


def test_max_to_keep_and_interval(tmp_path):
    tree = {"x": jnp.arange(4.0)}
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        written = [ckpt.save(s, {"x": tree["x"] + s}, {"s": s}) for s in range(7)]
        assert written == [True, False, True, False, True, False, True]
        assert ckpt.all_steps() == [4, 6]
        assert ckpt.save(7, tree, {}, force=True)
        assert ckpt.all_steps() == [6, 7]
        assert not ckpt.save(7, tree, {}, force=True)  # already saved: no error, no rewrite
        restored, meta = ckpt.restore(abstract_like(tree), step=6)
        np.testing.assert_array_equal(restored["x"], tree["x"] + 6)
        assert meta == {"s": 6}
        with pytest.raises(FileNotFoundError, match=r"step 3 .*available steps: \[6, 7\]"):
            ckpt.restore(abstract_like(tree), step=3)
    # Reopening the directory sees what is there.
    assert Checkpointer(tmp_path).latest_step() == 7
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)


def test_async_save(tmp_path):
    state, _ = _trained_state()
    ckpt = Checkpointer(tmp_path, async_save=True)
    assert ckpt.save(1, state, {"a": 1})
    ckpt.wait()
    restored, meta = ckpt.restore(abstract_like(state))
    _leaves_equal(state, restored)
    assert meta == {"a": 1}
    ckpt.close()


def test_other_model_names_leaf_path(tmp_path):
    state, _ = _trained_state()
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(3, state, {"fingerprint": model_fingerprint(Model(TINY))})
    wider = Model(ModelConfig(vocab_size=32, d_model=24, n_layers=1, n_heads=2, mlp_dim=32))
    other, _ = _trained_state(wider, steps=0)
    with pytest.raises(ValueError) as e:
        ckpt.restore(abstract_like(other))
    msg = str(e.value)
    assert str(tmp_path / "run") in msg and "step 3" in msg
    assert "params/" in msg and "expected shape" in msg and "16" in msg and "24" in msg
    # Fingerprint mismatch is caught before reading arrays, naming the field.
    with pytest.raises(ValueError, match=r"d_model: expected 24, found 16"):
        ckpt.restore(abstract_like(other), expected_fingerprint=model_fingerprint(wider))
    # Matching fingerprint restores.
    restored, _ = ckpt.restore(abstract_like(state),
                               expected_fingerprint=model_fingerprint(Model(TINY)))
    _leaves_equal(state, restored)
    # A structurally different target (extra leaf) names it.
    with pytest.raises(ValueError, match=r"leaf extra .*missing"):
        ckpt.restore({**{"extra": jnp.zeros(2)}, "s": abstract_like(state)})
    ckpt.close()


def test_fingerprint_ignores_runtime_fields():
    a = model_fingerprint(TINY)
    b = model_fingerprint(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                                      n_kv_heads=2, mlp_dim=32, remat=True, dtype="bfloat16"))
    assert a == b and a["n_kv_heads"] == 2 and a["head_dim"] == 8
    assert model_fingerprint(Model(TINY, kind="scalar"))["kind"] == "scalar"


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    ckpt = Checkpointer(missing)
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ckpt.restore({"x": jnp.zeros(2)})
    assert not missing.exists()  # restoring never creates the directory
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        Checkpointer(tmp_path / "empty").restore({"x": jnp.zeros(2)})


def test_meta_must_be_json(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(TypeError, match="object"):
        ckpt.save(0, {"x": jnp.zeros(2)}, {"bad": object()})
    assert ckpt.latest_step() is None


def test_preemption_guard_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.should_stop(1)
        assert guard.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_preemption_guard_sigint_optional():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard(sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C is not swallowed
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_check_finite():
    assert check_finite(jnp.float32(1.5), 3) == 1.5
    with pytest.raises(NonFiniteLossError, match="step 12") as e:
        check_finite(float("nan"), 12)
    assert e.value.step == 12 and e.value.name == "loss"
    with pytest.raises(NonFiniteLossError, match="ppo/loss.*step 4"):
        check_finite(np.array([np.inf]), 4, name="ppo/loss")
