"""Sharding: a sharded forward/gradient equals the 1-device one; rule-table and mesh errors.

Runs on the 8 fake CPU devices that ``conftest.py`` sets up
(``--xla_force_host_platform_device_count=8``).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import sharding
from rlhf_jax.config import ModelConfig, gpt2_config
from rlhf_jax.models.model import Model
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.types import positions_from_mask

ATOL = 1e-5

# Heads, KV heads, MLP width and vocab all divide tensor=2; d_model divides fsdp=4.
TINY_LLAMA = ModelConfig(arch="llama", vocab_size=96, d_model=32, n_layers=2, n_heads=4,
                         n_kv_heads=2, mlp_dim=64, max_positions=64)
TINY_GPT2 = gpt2_config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=96)
CONFIGS = {"llama": TINY_LLAMA, "gpt2": TINY_GPT2}


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 (fake) devices, have {jax.device_count()}: "
                    "set XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax")


def _batch(cfg: ModelConfig, b: int = 8, t: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Host batch with left padding of varying length (row 0 unpadded)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(b, t), dtype=np.int32)
    pad = rng.integers(0, t // 2, size=(b,))
    pad[0] = 0
    attn_mask = np.arange(t)[None, :] >= pad[:, None]
    positions = np.asarray(positions_from_mask(jnp.asarray(attn_mask)))
    return {"tokens": tokens, "positions": positions, "attn_mask": attn_mask}


def _logits(model: Model):
    def fwd(params, batch):
        return model.apply(params, batch["tokens"], batch["positions"], batch["attn_mask"]).logits
    return jax.jit(fwd)


def _grads(model: Model):
    def loss(params, batch):
        logits = model.apply(params, batch["tokens"], batch["positions"], batch["attn_mask"]).logits
        return jnp.mean(logits * batch["attn_mask"][..., None])
    return jax.jit(jax.grad(loss))


class _Reference:
    """One architecture's model, its 1-device params, logits and gradients (computed once:
    compiling a jitted init costs seconds on CPU, mostly threefry)."""

    def __init__(self, arch: str):
        self.model = Model(CONFIGS[arch])
        self.batch = _batch(self.model.cfg)
        self.params = jax.jit(self.model.init)(jax.random.key(0))
        device_batch = {k: jnp.asarray(v) for k, v in self.batch.items()}
        self.logits = np.asarray(_logits(self.model)(self.params, device_batch))
        self.grads = jax.tree.map(np.asarray, _grads(self.model)(self.params, device_batch))

    def place(self, mesh):
        """The same params placed on ``mesh``'s shardings."""
        return jax.device_put(self.params, self.model.param_shardings(mesh))


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(arch: str) -> _Reference:
        if arch not in cache:
            cache[arch] = _Reference(arch)
        return cache[arch]
    return get


def _assert_tree_close(actual, expected, atol=ATOL):
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree.leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fsdp_tensor_forward_matches_single_device(arch, reference):
    ref = reference(arch)
    mesh = sharding.make_mesh(MeshConfig(fsdp=4, tensor=2))
    params = ref.model.init_sharded(jax.random.key(0), mesh)
    # The sharded init builds the same parameters as the 1-device init.
    _assert_tree_close(params, ref.params, atol=1e-7)

    # Parameters really are sharded: the q kernel [L, D, H, K] splits D over fsdp, H over tensor.
    q = params["trunk"]["blocks"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    L, D, H, K = q.shape
    assert {s.data.shape for s in q.addressable_shards} == {(L, D // 4, H // 2, K)}
    embed = params["trunk"]["embed"]
    assert embed.sharding.spec == P("tensor", "fsdp")
    V, D = embed.shape
    assert {s.data.shape for s in embed.addressable_shards} == {(V // 2, D // 4)}

    with jax.set_mesh(mesh):
        logits = _logits(ref.model)(params, sharding.shard_batch(ref.batch, mesh))
    # The batch is split over (data, fsdp) = 4 shards of 2 rows.
    assert logits.shape == ref.logits.shape
    assert {s.data.shape[0] for s in logits.addressable_shards} == {2}
    np.testing.assert_allclose(np.asarray(logits), ref.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pure_data_parallel_forward_matches_single_device(arch, reference):
    ref = reference(arch)
    mesh = sharding.make_mesh(MeshConfig(data=8))
    params = ref.place(mesh)
    # data=8: parameters replicated, one row per device.
    assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(params))
    with jax.set_mesh(mesh):
        logits = _logits(ref.model)(params, sharding.shard_batch(ref.batch, mesh))
    assert {s.data.shape[0] for s in logits.addressable_shards} == {1}
    np.testing.assert_allclose(np.asarray(logits), ref.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch,mesh_cfg", [
    ("llama", MeshConfig(fsdp=4, tensor=2)),
    ("gpt2", MeshConfig(fsdp=4, tensor=2)),
    ("llama", MeshConfig(data=8)),
    ("gpt2", MeshConfig(data=2, fsdp=2, tensor=2)),
])
def test_sharded_gradient_matches_single_device(arch, mesh_cfg, reference):
    ref = reference(arch)
    mesh = sharding.make_mesh(mesh_cfg)
    params = ref.place(mesh)
    with jax.set_mesh(mesh):
        grads = _grads(ref.model)(params, sharding.shard_batch(ref.batch, mesh))
    _assert_tree_close(grads, ref.grads)


def test_every_head_kind_has_shardings():
    """The scalar value head carries logical axes too (no path left without a rule)."""
    mesh = sharding.make_mesh(MeshConfig(fsdp=4, tensor=2))
    for kind in ("lm_value", "scalar"):
        shardings = Model(TINY_LLAMA, kind=kind).param_shardings(mesh)
        assert shardings["value_head"]["kernel"].spec == P("fsdp")
        assert shardings["value_head"]["bias"].spec == P()


# ---- errors -------------------------------------------------------------------------------

def test_missing_rule_names_the_parameter_path():
    model = Model(TINY_LLAMA)
    mesh = sharding.make_mesh(MeshConfig(fsdp=4, tensor=2))
    rules = {k: v for k, v in sharding.PARAM_RULES.items() if k != "mlp"}
    with pytest.raises(ValueError,
                       match=r"\['mlp'\]\['down'\]\['kernel'\].*'mlp' has no sharding rule"):
        model.param_shardings(mesh, rules)


def test_leaf_without_logical_axes_raises_naming_path():
    mesh = sharding.make_mesh(MeshConfig(data=8))
    abstract = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32),
                "extra": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(ValueError, match=r"\['extra'\] carries no logical axes"):
        sharding.tree_shardings(abstract, {"w": ("embed", "mlp"), "extra": None}, mesh)
    with pytest.raises(ValueError, match=r"\['w'\]: 1 logical axes"):
        sharding.tree_shardings(abstract, {"w": ("embed",), "extra": ("norm",)}, mesh)


def test_batch_not_divisible_names_both_numbers():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # data x fsdp = 4
    batch = {"tokens": np.zeros((6, 5), np.int32)}
    with pytest.raises(ValueError, match=r"\['tokens'\] has batch size 6.*data x fsdp = 4"):
        sharding.shard_batch(batch, mesh)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=3, fsdp=2), MeshConfig(fsdp=3),
                                      MeshConfig(data=2, fsdp=2, tensor=4)])
def test_mesh_shape_must_match_device_count(mesh_cfg):
    with pytest.raises(ValueError, match=r"does not match the 8 available devices"):
        sharding.make_mesh(mesh_cfg)


def test_invalid_mesh_config_raises():
    with pytest.raises(ValueError, match="fsdp must be >= 1, got 0"):
        MeshConfig(fsdp=0)
    with pytest.raises(ValueError, match="data must be -1 or >= 1, got -2"):
        MeshConfig(data=-2)


def test_dimension_not_divisible_by_mesh_axis_names_path():
    cfg = ModelConfig(arch="llama", vocab_size=96, d_model=24, n_layers=1, n_heads=3,
                      head_dim=8, mlp_dim=64)
    model = Model(cfg)
    mesh = sharding.make_mesh(MeshConfig(data=4, tensor=2))
    with pytest.raises(ValueError, match=r"\['attn'\]\['(k|q|v|o)'\]\['kernel'\]: dimension \d "
                                         r"\('(kv_)?heads'\) has size 3, not divisible by mesh "
                                         r"axes \('tensor',\) of size 2"):
        model.init_sharded(jax.random.key(0), mesh)


# ---- constrain --------------------------------------------------------------------------

def test_constrain_is_noop_without_mesh():
    x = jnp.ones((8, 4, 32))
    assert sharding.constrain(x, ("batch", "seq", "embed")) is x
    # Inside jit without a mesh: no sharding constraint appears in the program.
    fn = jax.jit(lambda x: sharding.constrain(x, ("batch", "seq", "embed")) * 2)
    assert "sharding_constraint" not in str(jax.make_jaxpr(fn)(x))
    np.testing.assert_array_equal(fn(x), 2 * x)


def test_constrain_applies_under_mesh():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    x = jnp.ones((8, 4, 32))
    fn = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "seq", "mlp")))
    with jax.set_mesh(mesh):
        y = fn(x)
        assert "sharding_constraint" in str(jax.make_jaxpr(fn)(x))
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")


def _constraint_specs(fn, x) -> list[str]:
    """The ``sharding=`` of every sharding constraint in ``fn``'s jaxpr, as text."""
    jaxpr = jax.make_jaxpr(fn)(x).jaxpr
    return [str(e.params["sharding"].spec) for e in jaxpr.eqns
            if e.primitive.name == "sharding_constraint"]


def test_constrain_keeps_the_dimensions_that_divide_and_warns_once(monkeypatch):
    monkeypatch.setattr(sharding, "_WARNED", set())
    monkeypatch.delenv(sharding.STRICT_ENV, raising=False)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    x = jnp.ones((6, 4, 32))  # batch 6 over data x fsdp = 4 would need padding; mlp 32 divides
    fn = lambda x: sharding.constrain(x * 2, ("batch", "seq", "mlp"))
    msg = (r"\('batch', 'seq', 'mlp'\) on shape \(6, 4, 32\): dimension 0 \('batch'\) has size 6, "
           r"not divisible by mesh axes \('data', 'fsdp'\) of size 4")
    with jax.set_mesh(mesh):
        with pytest.warns(sharding.ShardingWarning, match=msg):
            specs = _constraint_specs(fn, x)
        # the batch dimension is left to GSPMD; the MLP dimension stays on the tensor axis
        assert specs == [str(P(P.UNCONSTRAINED, None, "tensor"))]
        with warnings.catch_warnings():
            warnings.simplefilter("error", sharding.ShardingWarning)  # once per shape: silent now
            y = jax.jit(fn)(x)
            _constraint_specs(fn, x)
        assert y.sharding.spec[2] == "tensor"
        np.testing.assert_array_equal(y, 2.0)
        # Another shape that does not divide warns again; one that divides does not warn.
        with pytest.warns(sharding.ShardingWarning, match=r"dimension 0 \('batch'\) has size 2,"):
            _constraint_specs(fn, jnp.ones((2, 4, 32)))
        with warnings.catch_warnings():
            warnings.simplefilter("error", sharding.ShardingWarning)
            assert _constraint_specs(fn, jnp.ones((8, 4, 32))) == [
                str(P(("data", "fsdp"), None, "tensor"))]
        # Two dimensions that do not divide are both named.
        with pytest.warns(sharding.ShardingWarning,
                          match=r"dimension 0 .* size 6.*; dimension 2 \('mlp'\) has size 5, not "
                                r"divisible by mesh axes \('tensor',\) of size 2"):
            assert _constraint_specs(fn, jnp.ones((6, 4, 5))) == [
                str(P(P.UNCONSTRAINED, None, P.UNCONSTRAINED))]


def test_constrain_strict_raises(monkeypatch):
    monkeypatch.setattr(sharding, "_WARNED", set())
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    x = jnp.ones((6, 4, 32))
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"dimension 0 \('batch'\) has size 6"):
            jax.make_jaxpr(lambda x: sharding.constrain(x, ("batch", "seq", "mlp"), strict=True))(x)
        monkeypatch.setenv(sharding.STRICT_ENV, "1")
        with pytest.raises(ValueError, match=r"not divisible by mesh axes \('data', 'fsdp'\)"):
            jax.make_jaxpr(lambda x: sharding.constrain(x, ("batch", "seq", "mlp")))(x)
        # strict=False wins over the environment
        with pytest.warns(sharding.ShardingWarning):
            jax.make_jaxpr(lambda x: sharding.constrain(x, ("batch", "seq", "mlp"),
                                                        strict=False))(x)
        with pytest.raises(ValueError, match=r"2 logical axes"):
            sharding.constrain(x, ("batch", "seq"))
