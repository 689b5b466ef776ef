"""Mixture-of-experts specifics beyond the family parity suite (``test_families.py`` checks
Mixtral and Qwen3-MoE logits, greedy decoding, export and sampler log-probs):

* the router's load-balancing loss equals transformers' ``aux_loss`` (left padding masked),
  and with frozen lower blocks covers exactly the trainable ones;
* the ``expert`` mesh axis shards the experts, and the sharded forward equals the
  single-device one;
* the trainers add ``router_aux_loss_coef`` x the loss (SFT, reward model, DPO, PPO).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.config import ModelConfig  # noqa: E402
from rlhf_jax.models.convert import load_hf_checkpoint  # noqa: E402
from rlhf_jax.models.model import Model  # noqa: E402
from rlhf_jax.types import positions_from_mask  # noqa: E402

V, B, T = 96, 4, 12
_TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=48, vocab_size=V, max_position_embeddings=64, bos_token_id=None,
             eos_token_id=None, pad_token_id=0, output_router_logits=True,
             router_aux_loss_coef=0.02)


def _hf(name):
    t = transformers
    if name == "mixtral":
        return t.MixtralForCausalLM(t.MixtralConfig(**_TINY, num_local_experts=4,
                                                    num_experts_per_tok=2))
    return t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(**_TINY, num_experts=4, num_experts_per_tok=3,
                                                  moe_intermediate_size=24, norm_topk_prob=False))


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[1, :3] = mask[2, :7] = mask[3, :1] = False  # left padding
    tokens[~mask] = 0
    return (jnp.asarray(tokens), jnp.asarray(mask), positions_from_mask(jnp.asarray(mask)))


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def loaded(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = _hf(request.param).eval()
    with torch.no_grad():  # a spread-out router, so the top-k choice is never a near tie
        for name, p in hf.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, params = load_hf_checkpoint(path)
    return request.param, hf, path, model, params


def test_router_aux_loss_equals_transformers(loaded):
    name, hf, _, model, params = loaded
    assert model.cfg.router_aux_loss_coef == pytest.approx(0.02)  # read from config.json
    assert model.cfg.num_params == model.num_params(params)  # E experts of every layer
    tokens, mask, pos = _batch()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
                    attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
                    position_ids=torch.tensor(np.asarray(pos), dtype=torch.long))
    ours = jax.jit(model.apply)(params, tokens, pos, mask)
    np.testing.assert_allclose(float(ours.router_aux_loss), float(theirs.aux_loss), rtol=1e-5)
    # a loose sanity bound on the scale (the exact value is the comparison above)
    assert float(ours.router_aux_loss) >= model.cfg.num_experts_per_tok * (1 - 1e-6) * 0.5

    # frozen lower block: the loss covers the trainable block (layer 1) only
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    frozen = Model(ModelConfig(**{**model.cfg.__dict__, "frozen_layers": 1}), "lm")
    out = jax.jit(frozen.apply)(params, tokens, pos, mask)
    want = load_balancing_loss_func((theirs.router_logits[1],), model.cfg.num_experts,
                                    model.cfg.num_experts_per_tok,
                                    torch.tensor(np.asarray(mask), dtype=torch.long))
    np.testing.assert_allclose(float(out.router_aux_loss), float(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logits)[np.asarray(mask)], np.asarray(ours.logits)[np.asarray(mask)],
                               atol=1e-6)


def test_router_aux_loss_is_differentiable_through_the_router(loaded):
    _, _, _, model, params = loaded
    tokens, mask, pos = _batch()
    grads = jax.grad(lambda p: model.apply(p, tokens, pos, mask).router_aux_loss)(params)
    mlp = grads["trunk"]["blocks"]["mlp"]
    assert float(jnp.abs(mlp["router"]["kernel"]).max()) > 0
    # the top block's experts feed no router: no aux gradient (the lower one's feed layer 1's)
    assert float(jnp.abs(mlp["gate"][-1]).max()) == 0
    assert float(jnp.abs(mlp["gate"][0]).max()) > 0


def test_expert_axis_shards_the_experts_and_keeps_the_forward(loaded):
    from rlhf_jax.sharding import MeshConfig, make_mesh

    _, _, _, model, params = loaded
    tokens, mask, pos = _batch()
    want = jax.jit(model.apply)(params, tokens, pos, mask)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    shardings = model.param_shardings(mesh)
    spec = shardings["trunk"]["blocks"]["mlp"]["gate"].spec  # [L, E, D, F]
    assert tuple(spec) == (None, "expert", "fsdp", "tensor")
    sharded = jax.device_put(params, shardings)
    shard = sharded["trunk"]["blocks"]["mlp"]["gate"].addressable_shards[0].data
    assert shard.shape[1] == model.cfg.num_experts // 2
    with jax.set_mesh(mesh):
        got = jax.jit(model.apply)(sharded, tokens, pos, mask)
    np.testing.assert_allclose(np.asarray(got.logits)[np.asarray(mask)], np.asarray(want.logits)[np.asarray(mask)],
                               atol=2e-5)
    np.testing.assert_allclose(float(got.router_aux_loss), float(want.router_aux_loss),
                               rtol=1e-5)


def test_trainers_add_the_weighted_router_aux_loss(loaded):
    """Each trainer's loss is its own loss plus ``router_aux_loss_coef`` x the aux loss: the
    same loss function evaluated with the coefficient unset and set differs by exactly that."""
    from rlhf_jax.train import dpo, reward, sft
    from rlhf_jax.train.ppo_phases import policy_forward
    from rlhf_jax.types import PreferenceBatch, SFTBatch

    _, _, _, model, params = loaded
    tokens, mask, pos = _batch()
    off = Model(ModelConfig(**{**model.cfg.__dict__, "router_aux_loss_coef": None}), "lm")
    aux = float(jax.jit(model.apply)(params, tokens, pos, mask).router_aux_loss)
    coef = model.cfg.router_aux_loss_coef

    loss_mask = mask.at[:, : T // 2].set(False)
    batch = SFTBatch(tokens=tokens, attn_mask=mask, positions=pos, loss_mask=loss_mask)
    n = jnp.asarray(float(loss_mask[:, 1:].sum())), jnp.asarray(float(B))

    def sft_loss(m):
        return sft.sft_loss_fn(params, batch, *n, model=m, cfg=sft.SFTConfig())

    (with_aux, metrics), (without, _) = sft_loss(model), sft_loss(off)
    np.testing.assert_allclose(float(with_aux) - float(without), coef * aux, rtol=1e-4)
    assert float(metrics["router/aux_loss"][0]) == pytest.approx(aux, rel=1e-5)

    pair = PreferenceBatch(tokens=jnp.stack([tokens, tokens[::-1]], 1),
                           attn_mask=jnp.stack([mask, mask[::-1]], 1),
                           positions=jnp.stack([pos, pos[::-1]], 1),
                           loss_mask=jnp.stack([loss_mask, loss_mask[::-1]], 1),
                           valid=jnp.ones((B, 2), bool))
    pair_aux = float(model.apply(params, pair.tokens.reshape(2 * B, T),
                                 pair.positions.reshape(2 * B, T),
                                 pair.attn_mask.reshape(2 * B, T)).router_aux_loss)
    ref = jnp.zeros((B, 2))
    total = jnp.asarray(float(B))
    dcfg = dpo.DPOConfig()
    d_on = dpo.dpo_loss_fn(params, pair, ref, total, model=model, cfg=dcfg)[0]
    d_off = dpo.dpo_loss_fn(params, pair, ref, total, model=off, cfg=dcfg)[0]
    np.testing.assert_allclose(float(d_on) - float(d_off), coef * pair_aux, rtol=1e-4)

    scalar, scalar_off = Model(model.cfg, "scalar"), Model(off.cfg, "scalar")
    rm_params = {"trunk": params["trunk"], "value_head": scalar.init(jax.random.key(0))[
        "value_head"]}
    rcfg = reward.RewardConfig()
    r_on = reward.reward_loss_fn(rm_params, pair, total, model=scalar, cfg=rcfg)[0]
    r_off = reward.reward_loss_fn(rm_params, pair, total, model=scalar_off, cfg=rcfg)[0]
    np.testing.assert_allclose(float(r_on) - float(r_off), coef * pair_aux, rtol=1e-4)

    from rlhf_jax.rollout.sampler import SamplingConfig

    *_, ppo_aux = policy_forward(model, params, tokens, pos, mask, T // 2,
                                 SamplingConfig(max_new_tokens=T // 2), with_router_aux=True)
    np.testing.assert_allclose(float(ppo_aux), aux, rtol=1e-5)


def test_dense_models_have_no_router_loss():
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, mlp_dim=64)
    model = Model(cfg)
    params = model.init(jax.random.key(0))
    tokens, mask, pos = _batch()
    assert model.apply(params, tokens, pos, mask).router_aux_loss is None
    with pytest.raises(ValueError, match="num_experts=4 is not supported by arch 'llama'"):
        ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, num_experts=4,
                    num_experts_per_tok=2)
    with pytest.raises(ValueError, match=r"num_experts_per_tok=5 must be in \[1, num_experts=4\]"):
        ModelConfig(arch="mixtral", vocab_size=V, d_model=32, n_layers=2, n_heads=4, mlp_dim=64,
                    num_experts=4, num_experts_per_tok=5)
