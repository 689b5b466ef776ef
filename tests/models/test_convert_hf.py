"""HF checkpoint conversion: logits parity with transformers (torch, float32), export round
trips, sharded loading/saving, scalar heads and error messages."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from rlhf_jax.models.convert import config_from_hf, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from rlhf_jax.models.model import Model, with_head  # noqa: E402
from rlhf_jax.models.tokenizer import eos_token_ids, load_tokenizer  # noqa: E402
from rlhf_jax.sharding import MeshConfig, make_mesh  # noqa: E402
from rlhf_jax.types import positions_from_mask  # noqa: E402

from ._hf import randomize_  # noqa: E402

TOL = 1e-4
VOCAB = 96


def _randomize(model, seed: int):
    """``randomize_`` with the 1-D norm weights (GPT-2's ``ln_*`` too, not biases) as scales."""
    return randomize_(model, seed, lambda name, p: ("norm" in name or "ln_" in name)
                      and p.ndim == 1 and not name.endswith("bias"))


def _hf_model(kind: str, tmp_path):
    torch.manual_seed(0)
    if kind == "gpt2":
        c = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64,
                                    vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
        m = transformers.GPT2LMHeadModel(c)
    elif kind == "llama":  # GQA, untied, llama3 rope scaling hitting all three bands
        c = transformers.LlamaConfig(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=128,
            tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
            bos_token_id=0, eos_token_id=1)
        m = transformers.LlamaForCausalLM(c)
    elif kind == "qwen2":  # q/k/v biases, tied embeddings
        c = transformers.Qwen2Config(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=128,
            tie_word_embeddings=True, rope_theta=1e6, bos_token_id=0, eos_token_id=1)
        m = transformers.Qwen2ForCausalLM(c)
    else:
        raise ValueError(kind)
    m = _randomize(m, seed=1)
    path = tmp_path / f"hf_{kind}"
    m.save_pretrained(path)
    return m, path


def _batch(seed=0, b=3, t=24, pads=(0, 5, 11)):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, VOCAB, (b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    for i, p in enumerate(pads):
        mask[i, :p] = False
        tokens[i, :p] = 0
    return tokens, mask, np.asarray(positions_from_mask(jnp.asarray(mask)))


def _ours(model, params, tokens, mask, pos):
    f = jax.jit(lambda p, t, po, m: model.apply(p, t, po, m).logits)
    return np.asarray(f(params, tokens, pos, mask))


def _theirs(m, tokens, mask, pos):
    with torch.no_grad():
        return m(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(pos, dtype=torch.long)).logits.float().numpy()


def _max_diff(a, b, mask):
    return float(np.abs(a - b)[mask].max())


@pytest.fixture(params=["gpt2", "llama", "qwen2"])
def hf_ckpt(request, tmp_path):
    m, path = _hf_model(request.param, tmp_path)
    return request.param, m, path


def test_load_matches_transformers_logits(hf_ckpt):
    kind, m, path = hf_ckpt
    model, params = load_hf_checkpoint(path)
    cfg = model.cfg
    if kind == "llama":
        assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3"
        assert not cfg.tie_embeddings and cfg.num_kv_heads == 2 and "lm_head" in params
    if kind == "qwen2":
        assert cfg.qkv_bias and cfg.tie_embeddings and "lm_head" not in params
    tokens, mask, pos = _batch()
    ours, theirs = _ours(model, params, tokens, mask, pos), _theirs(m, tokens, mask, pos)
    diff = _max_diff(ours, theirs, mask)
    print(f"{kind}: max|dlogits| = {diff:.2e} (logit scale {np.abs(theirs[mask]).max():.1f})")
    assert np.abs(theirs[mask]).max() > 1.0  # a meaningful comparison
    assert diff <= TOL


def _perturbed_init(model: Model, seed: int):
    """Random parameters for ``model`` (NumPy: no per-shape XLA compiles): N(0, 0.2), norm
    scales 1 + N(0, 0.2)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.normal(0.0, 0.2, x.shape).astype(np.float32)
        return jnp.asarray(1.0 + noise if jax.tree_util.keystr(path).endswith("['scale']")
                           else noise)

    return jax.tree_util.tree_map_with_path(draw, model.abstract_params())


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_export_round_trip(kind, tmp_path):
    _, path = _hf_model(kind, tmp_path)
    cfg = config_from_hf(path)
    model = Model(cfg)
    params = _perturbed_init(model, 3)
    out = save_hf_checkpoint(model, params, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens, mask, pos = _batch(seed=1)
    ours = _ours(model, params, tokens, mask, pos)
    diff = _max_diff(ours, _theirs(m, tokens, mask, pos), mask)
    print(f"{kind} export: max|dlogits| = {diff:.2e}")
    assert diff <= TOL
    model2, params2 = load_hf_checkpoint(out)
    assert model2 == model
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, params2)


# The 3-row batch does not split over fsdp=4: the forward leaves the batch dimension of its
# activations unconstrained and says so (ShardingWarning); the parameters are what is tested.
@pytest.mark.filterwarnings("ignore::rlhf_jax.sharding.ShardingWarning")
def test_sharded_files_and_mesh_shardings(tmp_path):
    _, path = _hf_model("llama", tmp_path)
    model, params = load_hf_checkpoint(path)
    out = save_hf_checkpoint(model, params, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    assert not (out / "model.safetensors").exists()
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens, mask, pos = _batch()
    ref = _ours(model, params, tokens, mask, pos)
    assert _max_diff(ref, _theirs(m, tokens, mask, pos), mask) <= TOL

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model_s, params_s = load_hf_checkpoint(out, shardings=mesh)
    want = model.param_shardings(mesh)
    jax.tree.map(lambda x, s: assert_sharding(x, s), params_s, want)
    assert params_s["trunk"]["blocks"]["attn"]["q"]["kernel"].sharding.spec != \
        jax.sharding.PartitionSpec()  # actually sharded
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, params_s)
    with jax.set_mesh(mesh):
        got = _ours(model_s, params_s, tokens, mask, pos)
    np.testing.assert_allclose(got, ref, atol=TOL)
    # Saving gathers sharded arrays back: same tensors as the unsharded save.
    out2 = save_hf_checkpoint(model_s, params_s, tmp_path / "from_sharded")
    single = load_file(out2 / "model.safetensors")
    merged = {}
    for f in files:
        merged.update(load_file(out / f))
    assert single.keys() == merged.keys()
    for k in single:
        np.testing.assert_array_equal(single[k], merged[k])


def assert_sharding(x, s):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


def test_scalar_head_round_trip_and_hf_sequence_classification(tmp_path):
    _, path = _hf_model("llama", tmp_path)
    cfg = config_from_hf(path)
    rm = Model(cfg, "scalar")
    params = _perturbed_init(rm, 5)
    out = save_hf_checkpoint(rm, params, tmp_path / "rm", config_extra={"pad_token_id": 0})
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg_json["num_labels"] == 1
    rm2, params2 = load_hf_checkpoint(out, kind="scalar")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, params2)
    tokens, mask, pos = _batch(pads=(0, 0, 0))
    values = np.asarray(rm.apply(params, tokens, pos, mask).values)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, dtype=torch.float32).eval()
    with torch.no_grad():
        score = hf(input_ids=torch.tensor(tokens, dtype=torch.long)).logits[:, 0].numpy()
    bias = float(params["value_head"]["bias"])
    # HF's classifier has no bias: same reward up to our constant bias.
    np.testing.assert_allclose(score, values[:, -1] - bias, atol=TOL)


def test_lm_checkpoint_into_value_kinds(tmp_path):
    _, path = _hf_model("qwen2", tmp_path)
    model, lm_params = load_hf_checkpoint(path)
    rng = jax.random.key(7)
    vm, v_params = load_hf_checkpoint(path, kind="lm_value", rng=rng)
    # with_head under jit (one compile instead of one per parameter shape); eager and jitted
    # random draws may differ in the last float bit, hence allclose.
    expected = jax.jit(lambda p, r: with_head(p, vm, r))(lm_params, rng)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-6, atol=1e-7),
                 expected, v_params)
    _, s_params = load_hf_checkpoint(path, kind="scalar", rng=rng)
    assert set(s_params) == {"trunk", "value_head"}
    # lm_value export -> reload keeps the head; loading it as kind="lm" drops it.
    out = save_hf_checkpoint(vm, v_params, tmp_path / "lmv")
    _, again = load_hf_checkpoint(out, kind="lm_value", rng=jax.random.key(99))
    np.testing.assert_array_equal(np.asarray(again["value_head"]["kernel"]),
                                  np.asarray(v_params["value_head"]["kernel"]))
    _, as_lm = load_hf_checkpoint(out)
    assert set(as_lm) == {"trunk"}


def test_bfloat16_load_and_save(tmp_path):
    _, path = _hf_model("gpt2", tmp_path)
    model, params = load_hf_checkpoint(path, dtype="bfloat16")
    assert model.cfg.param_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    out = save_hf_checkpoint(model, params, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _, params2 = load_hf_checkpoint(out, dtype="bfloat16")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, params2)


def test_tokenizer_files_are_written(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="a")
    _, path = _hf_model("gpt2", tmp_path)
    model, params = load_hf_checkpoint(path)
    out = save_hf_checkpoint(model, params, tmp_path / "with_tok", tokenizer=hf_tok,
                             generation_config={"eos_token_id": 1})
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 1}
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again.eos_token == "a" and again.pad_token is None
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 1  # from tokenizer
    loaded = load_tokenizer(out)  # no pad token in the files: EOS is used
    assert loaded.pad_token == "a" and loaded.pad_token_id == 1
    assert eos_token_ids(loaded, out) == (1,)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "no_such_dir")
    out2 = save_hf_checkpoint(model, params, tmp_path / "copied_tok", tokenizer=out)
    assert (out2 / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


# ---- errors ----------------------------------------------------------------------------
def _rewrite(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    save_file(fn(dict(tensors)), f, metadata={"format": "pt"})


def test_missing_renamed_tensor_names_it(tmp_path):
    _, path = _hf_model("llama", tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"

    def rename(t):
        t["model.layers.1.mlp.upp_proj.weight"] = t.pop(name)
        return t

    _rewrite(path, rename)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf_checkpoint(path)


def test_unexpected_tensor_names_it_and_the_file(tmp_path):
    _, path = _hf_model("llama", tmp_path)
    _rewrite(path, lambda t: {**t, "model.layers.0.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"
                                         r".*model\.safetensors"):
        load_hf_checkpoint(path)


def test_wrong_shape_names_tensor_file_and_shapes(tmp_path):
    _, path = _hf_model("qwen2", tmp_path)
    name = "model.layers.0.self_attn.k_proj.bias"
    _rewrite(path, lambda t: {**t, name: np.zeros((7,), np.float32)})
    with pytest.raises(ValueError, match=r"k_proj\.bias' in .*model\.safetensors has shape "
                                         r"\(7,\), expected \(32,\)"):
        load_hf_checkpoint(path)


def test_missing_files(tmp_path):
    _, path = _hf_model("gpt2", tmp_path)
    model, params = load_hf_checkpoint(path)
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path / "nowhere")
    out = save_hf_checkpoint(model, params, tmp_path / "sharded", max_shard_bytes=20_000)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_hf_checkpoint(out)


def test_tied_checkpoint_with_equal_lm_head_is_accepted(tmp_path):
    _, path = _hf_model("qwen2", tmp_path)
    _rewrite(path, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].copy()})
    load_hf_checkpoint(path)
    _rewrite(path, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        load_hf_checkpoint(path)


def test_config_errors():
    with pytest.raises(ValueError, match=r"'bert'.*llama, mistral, qwen2, smollm, gpt2"):
        config_from_hf({"model_type": "bert"})
    base = dict(model_type="llama", hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                intermediate_size=64, vocab_size=10)
    with pytest.raises(ValueError, match="'longrope'"):  # yarn and dynamic are supported now
        config_from_hf({**base, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}})
    with pytest.raises(ValueError, match="gelu"):
        config_from_hf({**base, "hidden_act": "gelu"})
    cfg = config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0},
                          "rope_theta": 5e5})
    assert cfg.rope_scaling.rope_type == "linear" and cfg.rope_scaling.factor == 2.0
    assert cfg.rope_theta == 5e5 and cfg.n_kv_heads == 4 and not cfg.qkv_bias
    cfg = config_from_hf({**base, "model_type": "smollm",
                          "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}})
    assert cfg.rope_theta == 1e5 and cfg.rope_scaling is None
    cfg = config_from_hf({"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2,
                          "n_positions": 32, "vocab_size": 50, "n_inner": 40})
    assert cfg.arch == "gpt2" and cfg.mlp_dim == 40 and cfg.tie_embeddings


def test_mistral_config_loads_as_llama(tmp_path):
    c = transformers.MistralConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=1, intermediate_size=48, vocab_size=VOCAB,
                                   sliding_window=None)
    m = _randomize(transformers.MistralForCausalLM(c), 2)
    m.save_pretrained(tmp_path / "mistral")
    model, params = load_hf_checkpoint(tmp_path / "mistral")
    tokens, mask, pos = _batch()
    assert _max_diff(_ours(model, params, tokens, mask, pos), _theirs(m, tokens, mask, pos),
                     mask) <= TOL
    out = save_hf_checkpoint(model, params, tmp_path / "mistral_out", model_type="mistral")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mistral"
