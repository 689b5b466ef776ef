"""Every architecture family against transformers, on tiny random checkpoints that
transformers saves and ``rlhf_jax`` reloads (one checkpoint per family, shared by its checks):

1. logits of a left-padded batch (<= 1e-4, float32);
2. greedy decoding of 16 tokens identical to transformers' ``generate``;
3. export -> transformers reload gives the same logits (and our reload the same params);
4. sampler log-probs equal to the training forward's;

plus the scalar head exported as ``*ForSequenceClassification``. The sliding-window cases
(Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3) use a window of 4 on 24-token sequences, so most
positions attend beyond it.

Cost: per family one jitted forward ``[B, P+R]`` (serving checks 1-4) and one jitted sampler,
compiled ahead of time with LLVM's cheap pipeline (``_FAST_COMPILE``: half the compile time,
the same HLO, so the same arithmetic up to float rounding).
"""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.losses.logprobs import sequence_logprobs  # noqa: E402
from rlhf_jax.models.convert import config_from_hf, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from rlhf_jax.models.model import Model  # noqa: E402
from rlhf_jax.rollout.sampler import SamplingConfig, make_sampler  # noqa: E402

TOL = 1e-4
V = 128
B, P, R = 4, 8, 16
PAD = 0
WINDOW = 4
_TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=64, vocab_size=V, max_position_embeddings=64, bos_token_id=None,
             eos_token_id=None, pad_token_id=PAD)


def _hf_config(name):
    """``(config, causal-LM class)`` of each case: tiny, every option of the family on."""
    t = transformers
    if name == "mistral_window":
        return t.MistralConfig(**_TINY, sliding_window=WINDOW), t.MistralForCausalLM
    if name == "qwen2_window":  # layer 0 full, layer 1 sliding (max_window_layers=1)
        return t.Qwen2Config(**_TINY, use_sliding_window=True, sliding_window=WINDOW,
                             max_window_layers=1, tie_word_embeddings=True), t.Qwen2ForCausalLM
    if name == "qwen3":
        return t.Qwen3Config(**_TINY, head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                             max_window_layers=1), t.Qwen3ForCausalLM
    if name == "gemma":
        return t.GemmaConfig(**_TINY, head_dim=8), t.GemmaForCausalLM
    if name == "gemma2":
        return t.Gemma2Config(**_TINY, head_dim=16, sliding_window=WINDOW,
                              query_pre_attn_scalar=12, attn_logit_softcapping=3.0,
                              final_logit_softcapping=10.0), t.Gemma2ForCausalLM
    if name == "gemma3":
        return t.Gemma3TextConfig(
            **_TINY, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default",
                                                   "rope_theta": 1e4}}), t.Gemma3ForCausalLM
    if name == "gpt_neox":
        kw = {k: v for k, v in _TINY.items() if k != "num_key_value_heads"}
        return t.GPTNeoXConfig(**dict(kw, hidden_size=64), rotary_pct=0.25,
                               use_parallel_residual=True), t.GPTNeoXForCausalLM
    if name == "phi3":
        return t.Phi3Config(**_TINY, sliding_window=WINDOW, partial_rotary_factor=0.5,
                            original_max_position_embeddings=64), t.Phi3ForCausalLM
    if name == "olmo2":
        return t.Olmo2Config(**_TINY), t.Olmo2ForCausalLM
    raise ValueError(name)


#: Weight seeds that keep every greedy decision's top-2 logit gap above 1e-3 (seed 1 gives
#: Gemma 2 a near tie).
_SEEDS = {"gemma2": 4}
CASES = ["mistral_window", "qwen2_window", "qwen3", "gemma", "gemma2", "gemma3", "gpt_neox",
         "phi3", "olmo2"]


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_sequence_logprobs = jax.jit(sequence_logprobs)  # one shape for every family: one compile


def _run(jitted, *args):
    """``jitted(*args)``, compiled with ``_FAST_COMPILE``."""
    return jitted.lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


def _randomize(model, seed):
    """Weights ~ N(0, 0.2), norm scales 1 + N(0, 0.2): every path matters, logits O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            is_scale = ("norm" in name or "layernorm" in name) and not name.endswith("bias")
            p.copy_(1.0 + noise if is_scale else noise)
    return model.eval()


def _torch(x):
    return torch.tensor(np.asarray(x), dtype=torch.long)


def _hf_logits(m, tokens, mask, pos):
    with torch.no_grad():
        return m(input_ids=_torch(tokens), attention_mask=_torch(mask),
                 position_ids=_torch(pos)).logits.float().numpy()


def _hf_generate(m, tokens, mask, eos):
    with torch.no_grad():
        out = m.generate(input_ids=_torch(tokens), attention_mask=_torch(mask), do_sample=False,
                         max_new_tokens=R, eos_token_id=[eos], pad_token_id=PAD)
    gen = out[:, P:].numpy()
    return np.pad(gen, ((0, 0), (0, R - gen.shape[1])), constant_values=PAD)


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    """One family: the transformers model, our reload (``lm_value``: LM and value heads),
    one greedy sampler run and one training forward over what it sampled."""
    name = request.param
    torch.manual_seed(0)
    hf_cfg, cls = _hf_config(name)
    hf = _randomize(cls(hf_cfg), seed=_SEEDS.get(name, 1))
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    model, params = load_hf_checkpoint(path, kind="lm_value", rng=jax.random.key(3))

    rng = np.random.default_rng(0)
    tokens = rng.integers(2, V, (B, P)).astype(np.int32)
    mask = np.ones((B, P), bool)
    for i, n_pad in enumerate((0, 2, 5, 7)):
        mask[i, :n_pad], tokens[i, :n_pad] = False, PAD
    # an EOS id greedy decoding never produces: all R tokens are compared
    first = _hf_generate(hf, tokens, mask, eos=1)
    eos = int(min(set(range(2, V)) - set(first.ravel().tolist())))
    gen = _hf_generate(hf, tokens, mask, eos=eos)

    scfg = SamplingConfig(max_new_tokens=R, greedy=True, eos_token_id=eos, pad_token_id=PAD)
    out = _run(make_sampler(model, scfg).jitted, params, jnp.asarray(tokens), jnp.asarray(mask),
               jax.random.key(0))
    seq, seq_mask, seq_pos = (np.asarray(x) for x in (out.tokens, out.attn_mask, out.positions))
    fwd = _run(jax.jit(model.apply), params, seq, seq_pos, seq_mask)
    return types.SimpleNamespace(
        name=name, hf=hf, path=path, model=model, params=params, prompt=(tokens, mask),
        gen=gen, out=out, seq=(seq, seq_mask, seq_pos), logits=np.asarray(fwd.logits),
        values=np.asarray(fwd.values), theirs=_hf_logits(hf, seq, seq_mask, seq_pos))


def _diff(a, b, mask):
    return float(np.abs(a - b)[mask].max())


def test_logits_with_left_padding(case):
    seq, mask, _ = case.seq
    assert mask.sum(1).min() > 2 * WINDOW and (~mask).any()  # beyond the window, padded
    diff = _diff(case.logits, case.theirs, mask)
    print(f"{case.name}: max|dlogits| = {diff:.2e} "
          f"(logit scale {np.abs(case.theirs[mask]).max():.1f})")
    assert np.abs(case.theirs[mask]).max() > 1.0
    assert diff <= TOL


def test_greedy_equals_generate(case):
    seq, mask, _ = case.seq
    np.testing.assert_array_equal(case.gen, np.asarray(case.out.response))
    assert bool(np.all(np.asarray(case.out.response_mask)))  # 16 tokens, no EOS
    # the logits agree within 1e-4, so equal argmaxes need larger top-2 gaps than that
    top2 = np.sort(case.logits[:, P - 1:P + R - 1].astype(np.float64), axis=-1)[..., -2:]
    assert float(np.min(top2[..., 1] - top2[..., 0])) > 1e-3


def test_sampler_logprobs_equal_training_forward(case):
    seq, _, _ = case.seq
    train = np.asarray(_sequence_logprobs(jnp.asarray(case.logits), jnp.asarray(seq)))[:, P:]
    diff = float(np.max(np.abs(train - np.asarray(case.out.logprobs))))
    print(f"{case.name}: max|sampler logp - training logp| = {diff:.1e}")
    assert diff <= 1e-5


def test_export_reloads_in_transformers(case, tmp_path):
    seq, mask, pos = case.seq
    lm = Model(case.model.cfg, "lm")
    lm_params = {k: v for k, v in case.params.items() if k != "value_head"}
    out = save_hf_checkpoint(lm, lm_params, tmp_path / "lm")
    config = json.loads((out / "config.json").read_text())
    want_type = {"mistral_window": "mistral", "qwen2_window": "qwen2",
                 "gemma3": "gemma3_text"}.get(case.name, case.name)
    assert config["model_type"] == want_type
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    diff = _diff(case.logits, _hf_logits(m, seq, mask, pos), mask)
    print(f"{case.name} export: max|dlogits| = {diff:.2e}")
    assert diff <= TOL
    model2, params2 = load_hf_checkpoint(out)
    assert model2.cfg == case.model.cfg and model2.kind == "lm"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 lm_params, params2)

    # scalar head: transformers' *ForSequenceClassification scores the last token, no bias
    rm = Model(case.model.cfg, "scalar")
    rm_params = {"trunk": case.params["trunk"], "value_head": case.params["value_head"]}
    out = save_hf_checkpoint(rm, rm_params, tmp_path / "rm", config_extra={"pad_token_id": PAD})
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, dtype=torch.float32).eval()
    with torch.no_grad():
        score = hf_rm(input_ids=torch.tensor(seq, dtype=torch.long),
                      attention_mask=torch.tensor(mask, dtype=torch.long),
                      position_ids=torch.tensor(pos, dtype=torch.long)).logits[:, 0].numpy()
    bias = float(case.params["value_head"]["bias"])
    np.testing.assert_allclose(score, case.values[:, -1] - bias, atol=TOL)


def test_window_matters():
    """Without its window the Mistral case would compute something else (the parity above
    is sensitive to the window), and its config names the window."""
    cfg = config_from_hf({**_hf_config("mistral_window")[0].to_dict()})
    assert cfg.sliding_window == WINDOW and cfg.layer_kinds == ("sliding", "sliding")
    cfg = config_from_hf(_hf_config("qwen2_window")[0].to_dict())
    assert cfg.sliding_window == WINDOW and cfg.layer_kinds == ("full", "sliding")


def test_every_family_has_sharding_rules_and_a_config_round_trip():
    """Each family's parameters are covered by the rule table on an (fsdp=4, tensor=2) mesh,
    and ``hf_config_dict`` -> ``config_from_hf`` gives the config back."""
    from rlhf_jax.models.convert import hf_config_dict
    from rlhf_jax.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    for name in CASES:
        cfg = config_from_hf(_hf_config(name)[0].to_dict())
        for kind in ("lm_value", "scalar"):
            Model(cfg, kind).param_shardings(mesh)
        assert config_from_hf(hf_config_dict(cfg)) == cfg, name


@pytest.mark.parametrize("config,match", [
    # a window the family cannot honour is refused, never ignored
    (dict(model_type="mistral", layer_types=["full_attention"]), "layer_types"),
    (dict(model_type="olmo2", sliding_window=8), "sliding_window"),
    (dict(model_type="gemma3_text", attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(model_type="gemma2", use_bidirectional_attention=True), "use_bidirectional"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
    (dict(model_type="gpt_neox", attention_bias=False), "attention_bias"),
    (dict(model_type="phi3", rope_scaling={"rope_type": "longrope", "short_factor": [1.0],
                                           "long_factor": [1.0]}), "longrope"),
    (dict(model_type="qwen3", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(model_type="gemma2", layer_types=["sliding_attention", "chunked_attention"]),
     "chunked_attention"),
    (dict(model_type="mixtral"), "'mixtral' is not supported"),
])
def test_unsupported_config_keys_raise(config, match):
    base = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, intermediate_size=64, vocab_size=V)
    with pytest.raises(ValueError, match=match):
        config_from_hf({**base, **config})


def test_model_config_refuses_options_its_family_cannot_express():
    from rlhf_jax.config import ModelConfig

    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, mlp_dim=64)
    with pytest.raises(ValueError, match=r"sliding_window=8 is not supported by arch 'gpt2'"):
        ModelConfig(arch="gpt2", sliding_window=8, **base)
    with pytest.raises(ValueError, match=r"attn_softcap.*'llama'"):
        ModelConfig(attn_softcap=30.0, **base)
    with pytest.raises(ValueError, match=r"arch must be one of llama, gpt2, .*got 'bert'"):
        ModelConfig(arch="bert", **base)
    with pytest.raises(ValueError, match="needs a sliding_window"):
        ModelConfig(arch="gemma2", layer_types=("sliding", "full"), **base)
    # export never drops the window: 'llama' cannot express it, 'mistral' is chosen
    from rlhf_jax.models.convert import hf_config_dict

    cfg = ModelConfig(sliding_window=8, **base)
    assert hf_config_dict(cfg)["model_type"] == "mistral"
    with pytest.raises(ValueError, match="cannot express sliding_window"):
        hf_config_dict(cfg, model_type="llama")
    # JSON round trip (model.json stores lists) keeps the config hashable and equal
    cfg = ModelConfig(arch="gemma2", sliding_window=4, layer_types=["sliding", "full"], **base)
    assert cfg.layer_types == ("sliding", "full") and hash(cfg)


def test_released_checkpoint_configs_map_as_transformers_reads_them():
    """Legacy keys of released configs (shapes shrunk): Pythia's ``rotary_pct`` /
    ``rotary_emb_base``, Gemma 3's ``rope_local_base_freq`` / ``sliding_window_pattern``,
    Gemma 2's implicit alternation, Mistral's implicit 4096 window."""
    pythia = dict(model_type="gpt_neox", hidden_act="gelu", hidden_size=64, intermediate_size=256,
                  layer_norm_eps=1e-5, max_position_embeddings=2048, num_attention_heads=4,
                  num_hidden_layers=2, rotary_emb_base=10000, rotary_pct=0.25,
                  tie_word_embeddings=False, use_parallel_residual=True, vocab_size=V)
    cfg = config_from_hf(pythia)
    assert (cfg.rotary_dim, cfg.parallel_residual, cfg.activation) == (4, True, None)
    gemma3 = dict(model_type="gemma3_text", hidden_size=32, intermediate_size=64, head_dim=8,
                  num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=7,
                  vocab_size=V, rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling=None,
                  sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=8,
                  final_logit_softcapping=None, attn_logit_softcapping=None)
    cfg = config_from_hf(gemma3)
    assert cfg.layer_kinds == ("sliding",) * 5 + ("full", "sliding")
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.attn_scale) == (1e6, 1e4, 8 ** -0.5)
    gemma2 = {**gemma3, "model_type": "gemma2", "num_hidden_layers": 3,
              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    cfg = config_from_hf(gemma2)
    assert cfg.layer_kinds == ("sliding", "full", "sliding") and cfg.attn_softcap == 50.0
    mistral = dict(model_type="mistral", hidden_size=32, intermediate_size=64,
                   num_attention_heads=4, num_hidden_layers=1, vocab_size=V)
    assert config_from_hf(mistral).sliding_window == 4096


def test_gpt_neox_reads_either_lm_head_name(tmp_path):
    """Pythia checkpoints (and transformers' save) name the LM head ``embed_out.weight``;
    transformers 5 calls the module ``lm_head``: a ``lm_head.weight`` tensor is read too."""
    from safetensors.numpy import load_file, save_file

    c, cls = _hf_config("gpt_neox")
    cls(c).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    _, want = load_hf_checkpoint(tmp_path)
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
    save_file(tensors, f, metadata={"format": "pt"})
    _, got = load_hf_checkpoint(tmp_path)
    np.testing.assert_array_equal(np.asarray(got["lm_head"]["kernel"]),
                                  np.asarray(want["lm_head"]["kernel"]))
