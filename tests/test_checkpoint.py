"""Checkpoint round trips, sharded restore, retention, mismatch errors, integrity (finite saves,
checksums, fallback to an older step when the newest is damaged)."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.checkpoint import (Checkpointer, CheckpointError, NonFiniteStateError, abstract_like,
                                 model_fingerprint, with_shardings)
from rlhf_jax.config import ModelConfig, config_to_dict
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


# --------------------------------------------------------------------------------------------
# Integrity: finite saves, checksums, fallback to an older step, clear errors
# --------------------------------------------------------------------------------------------


def _small_state(seed: int):
    """A tiny optax-style state with incompressible float data (so a flipped stored bit is a
    flipped array bit), an int counter and a typed key."""
    rs = np.random.RandomState(seed)
    params = {"w": jnp.asarray(rs.standard_normal(4096), jnp.float32),
              "b": jnp.asarray(rs.standard_normal((3, 5)), jnp.bfloat16)}
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt = tx.update(grads, opt, params)
    return {"params": optax.apply_updates(params, updates), "opt": opt,
            "step": jnp.int32(seed), "rng": jax.random.key(seed)}


def _two_steps(directory):
    """Steps 1 and 2 of distinct states; returns them."""
    s1, s2 = _small_state(1), _small_state(2)
    with Checkpointer(directory) as ckpt:
        assert ckpt.save(1, s1, {"step": 1}) and ckpt.save(2, s2, {"step": 2})
    return s1, s2


def _largest_data_file(directory, step):
    files = [p for p in (directory / str(step) / "state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _fallback_warning(caplog):
    lines = [r.getMessage() for r in caplog.records
             if r.levelno >= 30 and r.name == "rlhf_jax.checkpoint"]
    assert len(lines) == 1, lines
    assert "\n" not in lines[0]
    return lines[0]


def test_save_refuses_non_finite_state(tmp_path):
    good = _small_state(1)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(1, good, {})
        for bad_value, shown in ((jnp.nan, "nan"), (jnp.inf, "inf")):
            # an optimizer moment (not only the parameters) is checked
            bad = jax.tree.map(lambda x: x, good)
            mu = bad["opt"][0].mu
            bad["opt"] = (bad["opt"][0]._replace(mu={**mu, "w": mu["w"].at[7].set(bad_value)}),
                          *bad["opt"][1:])
            with pytest.raises(NonFiniteStateError, match=rf"step 2 .*opt/0/mu/w holds {shown}"):
                ckpt.save(2, bad, {}, force=True)
        assert ckpt.all_steps() == [1]
        state, _ = ckpt.restore(abstract_like(good))
    _leaves_equal(good, state)
    # require_finite=False writes it anyway, and restore then refuses it
    with Checkpointer(tmp_path / "unchecked") as ckpt:
        bad = {**good, "params": {**good["params"], "w": good["params"]["w"] * jnp.inf}}
        assert ckpt.save(3, bad, {}, require_finite=False)
        with pytest.raises(CheckpointError, match=r"step 3: leaf params/w holds inf"):
            ckpt.restore(abstract_like(good))


def test_bit_flip_falls_back_to_older_step(tmp_path, caplog):
    s1, _ = _two_steps(tmp_path)
    path = _largest_data_file(tmp_path, 2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        ckpt = Checkpointer(tmp_path)
        assert ckpt.latest_step() == 2
        state, meta = ckpt.restore(abstract_like(s1))
    assert meta == {"step": 1}
    _leaves_equal(s1, state)
    line = _fallback_warning(caplog)
    assert str(tmp_path) in line and "step 2 is unusable" in line and "restored step 1" in line
    # the unusable step is moved aside, so the resumed run can write step 2 again
    assert ckpt.set_aside_after(1) == [2]
    assert ckpt.all_steps() == [1]
    assert [p.name.split(".")[0] for p in (tmp_path / "unusable").iterdir()] == ["2"]
    assert ckpt.save(2, s1, {"step": 2})
    assert ckpt.restore(abstract_like(s1))[1] == {"step": 2}
    ckpt.close()


def test_bit_flip_without_older_step_is_a_clear_error(tmp_path):
    s1 = _small_state(1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, s1, {})
    path = _largest_data_file(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        Checkpointer(tmp_path).restore(abstract_like(s1))
    msg = str(e.value)
    assert msg.startswith(f"no usable checkpoint in {tmp_path}: step 1: ")
    assert "\n" not in msg and "TensorStore" not in msg and len(msg) < 400
    assert e.value.problems.keys() == {1}
    # an explicit step names itself
    with pytest.raises(CheckpointError, match=rf"checkpoint {tmp_path} step 1 is unusable: "):
        Checkpointer(tmp_path).restore(abstract_like(s1), step=1)


def test_swapped_array_data_is_a_checksum_mismatch(tmp_path, caplog):
    """Readable, well-formed array files of another step: only the checksums can tell."""
    s1, _ = _two_steps(tmp_path / "a")
    _, s2 = _two_steps(tmp_path / "b")
    shutil.rmtree(tmp_path / "a" / "2" / "state")
    shutil.copytree(tmp_path / "b" / "1" / "state", tmp_path / "a" / "2" / "state")
    with caplog.at_level("WARNING"):
        state, meta = Checkpointer(tmp_path / "a").restore(abstract_like(s2))
    assert meta == {"step": 1}
    _leaves_equal(s1, state)
    assert "checksum mismatch in leaf" in _fallback_warning(caplog)
    # without verification the wrong data would have been restored silently
    wrong, _ = Checkpointer(tmp_path / "a").restore(abstract_like(s2), step=2, verify=False)
    _leaves_equal(s1, wrong)


@pytest.mark.parametrize("damage", ["delete_meta", "empty_meta", "bad_meta", "empty_layout",
                                    "truncate_data", "delete_state"])
def test_damaged_newest_step_falls_back(tmp_path, caplog, damage):
    s1, _ = _two_steps(tmp_path)
    step2 = tmp_path / "2"
    if damage == "delete_meta":
        (step2 / "meta" / "metadata").unlink()
    elif damage == "empty_meta":
        (step2 / "meta" / "metadata").write_text("")
    elif damage == "bad_meta":
        (step2 / "meta" / "metadata").write_text('{"step": ')
    elif damage == "empty_layout":
        (step2 / "layout" / "metadata").write_text("")
    elif damage == "truncate_data":
        path = _largest_data_file(tmp_path, 2)
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "delete_state":
        shutil.rmtree(step2 / "state")
    with caplog.at_level("WARNING"):
        state, meta = Checkpointer(tmp_path).restore(abstract_like(s1))
    assert meta == {"step": 1}
    _leaves_equal(s1, state)
    line = _fallback_warning(caplog)
    assert "step 2" in line and "restored step 1" in line
    expected = {"delete_meta": "'meta'", "empty_meta": "'meta'", "bad_meta": "'meta'",
                "empty_layout": "'layout'", "truncate_data": "arrays", "delete_state": "arrays"}
    assert expected[damage] in line


def test_only_step_with_empty_meta_is_a_one_line_error(tmp_path):
    s1 = _small_state(1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, s1, {"step": 5})
    (tmp_path / "5" / "meta" / "metadata").write_text("")
    with pytest.raises(CheckpointError) as e:
        Checkpointer(tmp_path).restore(abstract_like(s1))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"no usable checkpoint in {tmp_path}: step 5: its 'meta' item is "
                          "missing or invalid JSON (JSONDecodeError: ")
    with pytest.raises(CheckpointError, match=r"step 5 is unusable: its 'meta' item"):
        Checkpointer(tmp_path).restore_meta()


def test_checksums_do_not_depend_on_sharding(tmp_path):
    """Saved from an 8-way sharded array, restored on one device (and back): verified."""
    mesh = make_mesh(MeshConfig(fsdp=8))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    tree = {"w": jax.device_put(jnp.asarray(np.random.RandomState(0).standard_normal((64, 3)),
                                            jnp.float32), sharded),
            "h": jax.device_put(jnp.arange(16, dtype=jnp.bfloat16), sharded)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, tree, {})
        single = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                          sharding=jax.sharding.SingleDeviceSharding(
                                              jax.devices()[0]))
                  for k, v in tree.items()}
        restored, _ = ckpt.restore(single)
        _leaves_equal(tree, restored)
        ckpt.save(2, restored, {})
        again, _ = ckpt.restore(abstract_like(tree), step=2)
        _leaves_equal(tree, again)
        assert again["w"].sharding.is_equivalent_to(sharded, 2)


def _reference_checksums(x: np.ndarray) -> list[int]:
    """The documented checksums with NumPy: sum of the uint32 words, and sum of
    fmix32(word + position * 0x9E3779B9) with position = 1 + row-major index, modulo 2**32."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        words = x.astype(np.uint64)
    elif x.dtype.itemsize == 4:
        words = x.view(np.uint32).astype(np.uint64)
    else:
        words = x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint8).astype(np.uint64)
    words = words.ravel()
    m = 2**32
    s1 = int(words.sum()) % m
    h = (words + np.arange(1, words.size + 1, dtype=np.uint64) * 0x9E3779B9) % m
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % m
    h ^= h >> 16
    return [s1, int(h.sum()) % m]


def test_stored_checksums_match_the_documented_formula(tmp_path):
    rs = np.random.RandomState(0)
    tree = {"f32": jnp.asarray(rs.standard_normal((3, 5)), jnp.float32),
            "bf16": jnp.asarray(rs.standard_normal(7), jnp.bfloat16),
            "i32": jnp.arange(-4, 5, dtype=jnp.int32),
            "u8": jnp.arange(250, 256, dtype=jnp.uint8),
            "mask": jnp.asarray([True, False, True]),
            "zeros": jnp.zeros((256, 256), jnp.float32), "ones": jnp.ones((256, 256))}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, tree, {})
    layout = json.loads((tmp_path / "1" / "layout" / "metadata").read_text())
    assert layout["format"] == 2 and layout["checksum_algorithm"] == "u32sum+fmix32sum"
    for name, x in tree.items():
        dtype, s1, s2 = layout["checksums"][name]
        assert dtype == str(x.dtype)
        assert [s1, s2] == _reference_checksums(np.asarray(x)), name
    # an all-zero array and an all-one array of 2**16 words: the plain sums coincide (0 mod
    # 2**32), the mixed sums do not, so zero-filled data is caught
    assert layout["checksums"]["zeros"][1] == 0 and layout["checksums"]["ones"][1] == 0
    assert layout["checksums"]["zeros"][2] != layout["checksums"]["ones"][2]
