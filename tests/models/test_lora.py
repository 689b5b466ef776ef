"""LoRA / QLoRA in the model (``rlhf_jax.models.lora``, ``Dense``): configuration checks, the
parameter tree and its sharding, zero-initialised adapters reproducing the base exactly, the
adapters-off forward, dropout, the quantised base (error bound, memory, logits), and the
merged HF export against transformers' logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import LoraConfig, ModelConfig, gpt2_config
from rlhf_jax.models import lora
from rlhf_jax.models.model import Model
from rlhf_jax.sharding import MeshConfig, make_mesh
from rlhf_jax.types import positions_from_mask

LLAMA = ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    mlp_dim=64, max_positions=64)
GPT2 = gpt2_config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=64)


def _with_lora(cfg: ModelConfig, kind: str = "lm", **lora_kw) -> Model:
    return Model(dataclasses.replace(cfg, lora=LoraConfig(**{"rank": 4, **lora_kw})), kind=kind)


def _batch(b=3, t=11, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab, (b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    mask[1, :3] = False  # left padding on one row
    return jnp.asarray(tokens), jnp.asarray(positions_from_mask(jnp.asarray(mask))), jnp.asarray(mask)


def _random_adapters(params, seed=5, scale=0.3):
    """Every ``lora_b`` (and ``lora_a``) replaced by N(0, scale) draws: adapters that matter."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if jax.tree_util.keystr(path).endswith(("['lora_b']", "['lora_a']")):
            return jnp.asarray(rng.normal(0.0, scale, x.shape).astype(np.float32))
        return x
    return jax.tree_util.tree_map_with_path(draw, params)


def _logits(model, params, batch, **kw):
    return np.asarray(jax.jit(lambda p, t, pos, m: model.apply(p, t, pos, m, **kw).logits)(
        params, *batch))


# ---- configuration ------------------------------------------------------------------------
def test_lora_config_defaults_and_validation():
    off = LoraConfig()
    assert off.rank is None and not off.enabled
    assert LoraConfig(rank=0).rank is None  # 0 is off, stored as None
    assert dataclasses.replace(LLAMA, lora=LoraConfig(rank=0)).lora is None
    c = LoraConfig(rank=8, alpha=16.0, targets=["q", "mlp"])
    assert c.targets == ("q", "mlp") and c.scale == 2.0
    assert c.target_names == ("q", "gate", "up", "down")
    assert LoraConfig(rank=8).scale == 1.0  # alpha defaults to r
    assert LoraConfig(rank=8).target_names == ("q", "k", "v", "o", "gate", "up", "down")
    for kw, msg in [(dict(rank=-1), "rank"), (dict(rank=4, alpha=0.0), "alpha"),
                    (dict(rank=4, dropout=1.0), "dropout"), (dict(rank=4, targets=("qq",)), "qq"),
                    (dict(alpha=8.0), "without a rank"),
                    (dict(rank=4, quantize_base="int2"), "quantize_base"),
                    (dict(rank=4, block_size=8), "needs quantize_base"),
                    (dict(rank=4, quantize_base="int8", block_size=0), "block_size")]:
        with pytest.raises(ValueError, match=msg):
            LoraConfig(**kw)
    moe = dict(arch="mixtral", num_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        dataclasses.replace(LLAMA, lora=LoraConfig(rank=4), **moe)
    assert dataclasses.replace(LLAMA, lora=LoraConfig(rank=4, targets=("attention",)),
                               **moe).lora.rank == 4
    with pytest.raises(ValueError, match="no such projection"):
        dataclasses.replace(GPT2, lora=LoraConfig(rank=4, targets=("gate",)))
    with pytest.raises(ValueError, match="block_size=24 must divide"):
        dataclasses.replace(LLAMA, lora=LoraConfig(rank=4, quantize_base="int8", block_size=24))


def test_adapter_leaves_shapes_axes_and_mesh_shardings():
    model = _with_lora(LLAMA, kind="lm_value", targets=("q", "o", "down"))
    abstract = model.abstract_params()["trunk"]["blocks"]
    axes = model.logical_axes()["trunk"]["blocks"]
    q, o, down = abstract["attn"]["q"], abstract["attn"]["o"], abstract["mlp"]["down"]
    assert q["lora_a"].shape == (2, 32, 4) and q["lora_b"].shape == (2, 4, 4, 8)
    assert o["lora_a"].shape == (2, 4, 8, 4) and o["lora_b"].shape == (2, 4, 32)
    assert down["lora_a"].shape == (2, 64, 4) and down["lora_b"].shape == (2, 4, 32)
    assert axes["attn"]["q"]["lora_a"] == ("layers", "embed", "lora_rank")
    assert axes["attn"]["q"]["lora_b"] == ("layers", "lora_rank", "heads", "kv")
    assert axes["attn"]["o"]["lora_a"] == ("layers", "heads", "kv", "lora_rank")
    for untargeted in (abstract["attn"]["k"], abstract["attn"]["v"], abstract["mlp"]["up"]):
        assert set(untargeted) == {"kernel"}
    assert "lora_a" not in model.abstract_params()["value_head"]
    shard = model.param_shardings(make_mesh(MeshConfig(fsdp=4, tensor=2)))["trunk"]["blocks"]
    assert tuple(shard["attn"]["q"]["lora_a"].spec) == (None, "fsdp", None)
    assert tuple(shard["attn"]["q"]["lora_b"].spec) == (None, None, "tensor", None)
    assert tuple(shard["mlp"]["down"]["lora_a"].spec) == (None, "tensor", None)


# ---- exactness ----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_zero_initialised_adapters_reproduce_the_base_logits_exactly(cfg):
    base_model = Model(cfg)
    base = base_model.init(jax.random.key(0))
    model = _with_lora(cfg, alpha=8.0)
    params = lora.attach(model, base, jax.random.key(1))
    a = params["trunk"]["blocks"]["attn"]["q"]["lora_a"]
    assert float(jnp.std(a)) > 0.05 and not np.any(np.asarray(params["trunk"]["blocks"]["attn"]
                                                              ["q"]["lora_b"]))
    batch = _batch()
    want = _logits(base_model, base, batch)
    np.testing.assert_array_equal(_logits(model, params, batch), want)  # x A 0 adds +0.0
    np.testing.assert_array_equal(_logits(model, params, batch, adapters=False), want)


def test_adapters_off_is_the_base_and_adapters_on_moves_the_logits():
    base_model = Model(LLAMA)
    base = base_model.init(jax.random.key(0))
    model = _with_lora(LLAMA)
    params = _random_adapters(lora.attach(model, base, jax.random.key(1)))
    batch = _batch()
    want = _logits(base_model, base, batch)
    np.testing.assert_array_equal(_logits(model, params, batch, adapters=False), want)
    assert np.abs(_logits(model, params, batch) - want).max() > 1e-2


def test_init_draws_adapters_as_attach_does():
    """``attach`` keeps the base and takes the adapters ``model.init`` draws from the key
    (the same draws; jit may round the ``1 / sqrt(fan_in)`` scaling differently by an ulp)."""
    model = _with_lora(LLAMA)
    fresh = model.init(jax.random.key(3))
    base = Model(LLAMA).init(jax.random.key(0))
    params = lora.attach(model, base, jax.random.key(3))
    np.testing.assert_allclose(params["trunk"]["blocks"]["mlp"]["up"]["lora_a"],
                               fresh["trunk"]["blocks"]["mlp"]["up"]["lora_a"], rtol=3e-7)
    np.testing.assert_array_equal(params["trunk"]["blocks"]["mlp"]["up"]["kernel"],
                                  base["trunk"]["blocks"]["mlp"]["up"]["kernel"])
    with pytest.raises(ValueError, match="lack trunk/final_norm/scale"):
        lora.attach(model, {**base, "trunk": {k: v for k, v in base["trunk"].items()
                                              if k != "final_norm"}}, jax.random.key(3))


def test_dropout_acts_on_the_adapter_input_only():
    model = _with_lora(LLAMA, dropout=0.5)
    base = Model(LLAMA).init(jax.random.key(0))
    zero = lora.attach(model, base, jax.random.key(1))
    batch = _batch()
    key = jax.random.key(9)
    # B = 0: the adapter adds 0 whatever its input, so dropout changes nothing
    np.testing.assert_array_equal(_logits(model, zero, batch, dropout_rng=key),
                                  _logits(model, zero, batch))
    params = _random_adapters(zero)
    plain = _logits(model, params, batch)
    dropped = _logits(model, params, batch, dropout_rng=key)
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(dropped, _logits(model, params, batch, dropout_rng=key))
    no_dropout = _with_lora(LLAMA)  # rate 0: a key changes nothing
    np.testing.assert_array_equal(_logits(no_dropout, params, batch, dropout_rng=key), plain)


# ---- QLoRA --------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype,block", [("int8", None), ("int4", None), ("int4", 16)])
def test_quantised_kernel_is_within_half_a_step_of_the_float_kernel(qtype, block):
    """Symmetric absmax rounding: every value within half a quantisation step (scale / 2)."""
    w = jax.random.normal(jax.random.key(0), (2, 32, 4, 8))
    q, scale = lora.quantize_kernel(w, n_lead=1, n_in=1, qtype=qtype, block_size=block)
    assert q.dtype == jnp.dtype(qtype) and q.shape == w.shape
    assert scale.shape == ((2, 1, 4, 8) if block is None else (2, 32 // block, 4, 8))
    deq = np.asarray(lora.dequantize_kernel(q, scale))
    step = np.repeat(np.asarray(scale), 32 // scale.shape[1], axis=1)
    assert np.all(np.abs(deq - np.asarray(w)) <= step / 2 + 1e-6)
    # qwix's symmetric range is [-(qmax + 1/2), qmax + 1/2] steps: scale = absmax / (qmax + 1/2)
    qmax = 127 if qtype == "int8" else 7
    if block is None:
        top = np.abs(np.asarray(w)).max(axis=1, keepdims=True)
        np.testing.assert_allclose(np.asarray(scale), top / (qmax + 0.5), rtol=1e-6)
    q = np.asarray(q).astype(np.int32)
    assert q.min() >= -qmax - 1 and q.max() <= qmax
    assert np.all(np.abs(q).max(axis=1) >= qmax)  # each channel uses the whole range


@pytest.mark.parametrize("qtype,tol", [("int8", 0.02), ("int4", 0.25)])
def test_qlora_base_is_smaller_and_close_to_the_float_base(qtype, tol):
    """A QLoRA model at init: the targeted kernels stored quantised (fewer bytes), the logits
    within ``tol`` x the largest logit of the float base's (measured: 0.7% for int8, 11% for
    int4 with per-channel scales, on this randomly initialised model)."""
    base_model = Model(LLAMA)
    base = base_model.init(jax.random.key(0))
    model = _with_lora(LLAMA, quantize_base=qtype)
    params = lora.attach(model, base, jax.random.key(1))
    q = params["trunk"]["blocks"]["attn"]["q"]
    assert set(q) == {"kernel_q", "kernel_scale", "lora_a", "lora_b"}
    assert q["kernel_q"].dtype == jnp.dtype(qtype) and q["lora_a"].dtype == jnp.float32
    frozen_q = lora.nbytes(lora.partition(params)[1]["trunk"]["blocks"])
    frozen_f = lora.nbytes(base["trunk"]["blocks"])
    assert frozen_q < 0.3 * frozen_f  # 1 byte per weight (int4 too, on the host) + scales
    batch = _batch()
    want = _logits(base_model, base, batch)
    got = _logits(model, params, batch)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{qtype}: max|dlogits| / max|logits| = {err:.3g}")
    assert 0 < err < tol
    np.testing.assert_array_equal(_logits(model, params, batch, adapters=False), got)


# ---- merged export ------------------------------------------------------------------------
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ._hf import randomize_  # noqa: E402


def _hf_llama(tmp_path):
    c = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 num_hidden_layers=2, intermediate_size=96, vocab_size=96,
                                 max_position_embeddings=128, tie_word_embeddings=False,
                                 rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    m = randomize_(transformers.LlamaForCausalLM(c), seed=1)
    m.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _theirs(path, tokens, positions, mask):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
                 attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
                 position_ids=torch.tensor(np.asarray(positions), dtype=torch.long)
                 ).logits.float().numpy()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_merged_export_matches_the_adapted_forward_in_transformers(quantize, tmp_path):
    """``save_hf_checkpoint`` of a LoRA model writes ``W + (alpha / r) A B`` (the quantised
    base dequantised): transformers' logits of the export equal our adapted forward."""
    from rlhf_jax.models.convert import load_hf_checkpoint, save_hf_checkpoint

    base_model, base = load_hf_checkpoint(_hf_llama(tmp_path))
    model = Model(dataclasses.replace(base_model.cfg, lora=LoraConfig(
        rank=4, alpha=8.0, quantize_base=quantize)))
    params = _random_adapters(lora.attach(model, base, jax.random.key(1)), scale=0.2)
    out = save_hf_checkpoint(model, params, tmp_path / "merged")
    batch = _batch(vocab=96, t=13)
    ours = _logits(model, params, batch)
    mask = np.asarray(batch[2])
    assert np.abs(ours - _logits(base_model, base, batch))[mask].max() > 0.1  # adapters matter
    diff = np.abs(ours - _theirs(out, *batch))[mask].max()
    print(f"merged export ({quantize}): max|dlogits| = {diff:.2e}")
    assert diff <= 1e-4
    plain, merged = lora.merge_adapters(model, params)
    assert plain.cfg.lora is None and plain.cfg == base_model.cfg
    exported_model, exported = load_hf_checkpoint(out)
    assert exported_model == plain
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 merged, exported)


def test_frozen_digest_sees_the_base_only():
    model = _with_lora(LLAMA, kind="scalar")
    base = Model(LLAMA, kind="scalar").init(jax.random.key(0))
    params = lora.attach(model, base, jax.random.key(1))
    d = lora.frozen_digest(params)
    assert lora.frozen_digest(_random_adapters(params)) == d  # adapters are not the base
    head = jax.tree.map(lambda x: x + 1.0, params["value_head"])
    assert lora.frozen_digest({**params, "value_head": head}) == d  # a trained head neither
    moved = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[0, 0].add(1e-3) if jax.tree_util.keystr(p).endswith(
            "['up']['kernel']") else x, params)
    assert lora.frozen_digest(moved) != d
