"""LoRA in the trainers: only the adapters (and a fresh scalar head) train, the optimizer holds
state for them alone, the reference "adapters off" equals an explicit reference copy in DPO
and PPO, one trace per shape, sharded == one device, and checkpoints that hold the adapters
(plus a digest of the frozen base) and resume bit-identically.

The explicit reference of the equivalence tests is a copy of the policy's *initial* LoRA
parameters: its adapters have ``B = 0``, so it computes the base model exactly (``x A 0`` adds
``+0.0``); "adapters off" computes the same base from the policy's own, moving, parameters."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import LoraConfig
from rlhf_jax.control import KLController
from rlhf_jax.models import lora
from rlhf_jax.models.model import Model
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.sharding import shard_batch
from rlhf_jax.train import ppo
from rlhf_jax.train.dpo import DPOConfig, make_dpo_step, make_reference_logps
from rlhf_jax.train.reward import make_reward_step
from rlhf_jax.train.sft import make_sft_step
from rlhf_jax.train.state import (OptimizerConfig, accumulate_gradients, create_train_state,
                                  make_optimizer, state_shardings)
from rlhf_jax.train.sft import SFTConfig, sft_loss_fn
from tests.train._tiny import (EOS, PAD, TINY, TraceCounter, assert_tree_close, fsdp_tensor_mesh,
                               host, host_params, on_device, pref_batch, prompts, reduced,
                               sft_batch)

OPT = OptimizerConfig(lr=1e-2, weight_decay=0.1)  # decay: frozen leaves must not decay either


def lora_model(kind: str = "lm", **kw) -> Model:
    return Model(dataclasses.replace(TINY, lora=LoraConfig(**{"rank": 4, "alpha": 8.0, **kw})),
                 kind=kind)


@functools.cache
def lora_host_params(kind: str = "lm", **kw):
    """``lora.attach`` of the shared tiny parameters (host copy; treat as read-only)."""
    model = lora_model(kind, **kw)
    return host(lora.attach(model, on_device(host_params(kind)), jax.random.key(7)))


def _names(path) -> str:
    return jax.tree_util.keystr(path)


def _changed(before, after) -> dict[str, bool]:
    flat = jax.tree_util.tree_flatten_with_path(before)[0]
    return {_names(p): not np.array_equal(np.asarray(a), np.asarray(b))
            for (p, a), b in zip(flat, jax.tree.leaves(after))}


# ---- what trains --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["sft", "sft_frozen_layer", "sft_int4", "reward"])
def test_only_adapter_leaves_change_after_a_step(variant):
    kind = "scalar" if variant == "reward" else "lm"
    kw = {"quantize_base": "int4"} if variant == "sft_int4" else {}
    frozen = 1 if variant == "sft_frozen_layer" else 0
    model = Model(dataclasses.replace(lora_model(kind, **kw).cfg, frozen_layers=frozen), kind=kind)
    params = lora_host_params(kind, **kw)
    tx = make_optimizer(OPT, params, frozen_layers=frozen)
    state = create_train_state(on_device(params), tx, jax.random.key(0))
    trainable_size = sum(x.size for x in jax.tree.leaves(lora.partition(params)[0]))
    opt_size = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert opt_size <= 2 * trainable_size + 8  # Adam moments of the trainable leaves only
    if kind == "scalar":
        step, batch = make_reward_step(model, tx), pref_batch()
    else:
        step, batch = make_sft_step(model, tx), sft_batch()
    for _ in range(2):  # the second step moves A too (its gradient is 0 while B = 0)
        state, metrics = step(state, batch)
    assert np.isfinite(reduced(metrics)["train/grad_norm"])
    changed = _changed(params, host(state.params))
    moved = {k for k, v in changed.items() if v}
    allowed = {k for k in changed if k.endswith(("['lora_a']", "['lora_b']"))
               or k.startswith("['value_head']")}
    assert moved and moved <= allowed, sorted(moved - allowed)
    targeted = [k for k in changed if k.endswith("['lora_b']")]
    assert len(targeted) == 7 and all(changed[k] for k in targeted)
    if kind == "scalar":
        assert changed["['value_head']['kernel']"]
    if frozen:  # the frozen lower block's adapters stay at their initialisation
        after = host(state.params)["trunk"]["blocks"]["mlp"]["up"]
        np.testing.assert_array_equal(after["lora_b"][0], 0.0)
        assert np.abs(after["lora_b"][1]).max() > 0


def test_gradients_are_none_on_the_frozen_base():
    """``accumulate_gradients`` differentiates the adapters only: the frozen base's gradient
    is never built (``None``), with or without microbatches."""
    model = lora_model()
    params = on_device(lora_host_params())
    batch = jax.tree.map(jnp.asarray, sft_batch())
    fn = functools.partial(sft_loss_fn, model=model, cfg=SFTConfig())
    n = jnp.asarray(10.0)
    for micro in (1, 2):
        grads = jax.eval_shape(lambda p, b: accumulate_gradients(fn, p, b, micro, n, n)[1],
                               params, batch)
        got = {_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]}
        want = {_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(
            lora.partition(params)[0])[0]}
        assert got == want and all(k.endswith(("['lora_a']", "['lora_b']")) for k in got)


# ---- reference = adapters off -------------------------------------------------------------
def _dpo_runs(steps: int = 3):
    model = lora_model()
    params = lora_host_params()
    tx = make_optimizer(OPT, params)
    out = {}
    for name, cfg, ref in (("base", DPOConfig(beta=0.1, reference_is_base=True), None),
                           ("copy", DPOConfig(beta=0.1), on_device(params))):
        step = make_dpo_step(model, tx, cfg)
        state = create_train_state(on_device(params), tx, jax.random.key(0))
        metrics = []
        for i in range(steps):
            state, m = step(state, pref_batch(seed=i), ref)
            metrics.append(reduced(m))
        out[name] = (host(state.params), metrics)
    return model, out


def test_dpo_reference_as_adapters_off_equals_an_explicit_reference_copy():
    model, out = _dpo_runs()
    (p_base, m_base), (p_copy, m_copy) = out["base"], out["copy"]
    for a, b in zip(m_base, m_copy):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert_tree_close(p_base, p_copy, atol=1e-7)
    assert m_base[-1]["dpo/loss"] < m_base[0]["dpo/loss"]
    # precomputed reference log-probs: adapters off on the *trained* policy = the initial copy
    batch = pref_batch(seed=9)
    off = make_reference_logps(model, adapters=False)(on_device(p_base), batch)
    copy = make_reference_logps(model)(on_device(lora_host_params()), batch)
    np.testing.assert_allclose(np.asarray(off), np.asarray(copy), rtol=1e-6, atol=1e-6)
    with_adapters = make_reference_logps(model)(on_device(p_base), batch)
    assert np.abs(np.asarray(with_adapters) - np.asarray(copy)).max() > 1e-4


def test_reference_is_base_needs_a_lora_model():
    tx = make_optimizer(OPT, host_params("lm"))
    with pytest.raises(ValueError, match="reference_is_base needs a model with LoRA"):
        make_dpo_step(Model(TINY), tx, DPOConfig(reference_is_base=True))
    cfg = ppo.PPOConfig(sampling=SamplingConfig(max_new_tokens=4), advantage="rloo",
                        num_samples=2, reference_is_base=True)
    with pytest.raises(ValueError, match="reference_is_base needs a policy with LoRA"):
        ppo.check_models(cfg, Model(TINY), None)


PPO_CFG = ppo.PPOConfig(
    sampling=SamplingConfig(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD),
    num_ppo_epochs=2, num_minibatches=2, kl_estimator="k3",
    kl=KLController(kind="fixed", init_kl_coef=0.5))


@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
def test_ppo_reference_as_adapters_off_equals_an_explicit_reference_copy(kl_penalty):
    """One rollout (the same jitted sampler for both), then ``learn`` twice: with
    ``reference_is_base`` and no reference argument, and with an explicit copy of the
    initial policy. 2 epochs x 2 minibatches: the policy moves, so the reference matters."""
    model = lora_model("lm_value")
    params = lora_host_params("lm_value")
    tx = make_optimizer(OPT, params)
    base_cfg = dataclasses.replace(PPO_CFG, kl_penalty=kl_penalty)
    p, pm = prompts(8, 6, seed=2)
    results = {}
    rollout = None
    for name, cfg, ref in (("base", dataclasses.replace(base_cfg, reference_is_base=True), None),
                           ("copy", base_cfg, on_device(params))):
        stages = ppo.PPOStages(policy_model=model, policy_tx=tx, cfg=cfg)
        state = ppo.init_ppo_state(create_train_state(on_device(params), tx, jax.random.key(1)),
                                   cfg.kl, jax.random.key(2))
        out, tokens, attn, positions = stages.generate(state, p, pm)
        if rollout is None:
            rollout = np.asarray(tokens)
        np.testing.assert_array_equal(np.asarray(tokens), rollout)  # same rollout
        scores = jnp.asarray(np.linspace(-1.0, 1.0, tokens.shape[0]), jnp.float32)
        # two learn calls on the same rollout: the second starts from a moved policy
        for _ in range(2):
            state, metrics = stages.learn(state, tokens, attn, positions, out.response_mask,
                                          out.ended, scores, ref)
        results[name] = (host(state.policy.params), reduced(metrics))
    (pa, ma), (pb, mb) = results["base"], results["copy"]
    assert ma.keys() == mb.keys()
    assert abs(ma["objective/kl"]) > 1e-6  # the second learn call saw a moved policy
    for k in ma:
        if "clipfrac" not in k:
            np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert_tree_close(pa, pb, atol=1e-6)
    moved = _changed(params, pa)
    assert moved["['value_head']['kernel']"] and not moved["['trunk']['embed']"]


# ---- traces, sharding ---------------------------------------------------------------------
def test_lora_step_traces_once_per_shape(monkeypatch):
    from rlhf_jax.train import sft as sft_module
    counter = TraceCounter(sft_module.sft_step)
    monkeypatch.setattr(sft_module, "sft_step", counter)
    model = lora_model(dropout=0.1)
    params = lora_host_params(dropout=0.1)
    tx = make_optimizer(OPT, params)
    step = sft_module.make_sft_step(model, tx, SFTConfig(num_microbatches=2))
    state = create_train_state(on_device(params), tx, jax.random.key(0))
    losses = []
    for i in range(3):
        state, m = step(state, sft_batch(seed=i % 2))
        losses.append(reduced(m)["sft/loss"])
    assert counter.count == 1 and all(np.isfinite(losses))


def test_sharded_lora_dpo_step_equals_single_device():
    """(fsdp=4, tensor=2) vs one device: DPO with the reference as adapters off, 2
    microbatches, adapter dropout; adapters and moments stay sharded as the rule table says."""
    model = lora_model(dropout=0.1)
    params = lora_host_params(dropout=0.1)
    tx = make_optimizer(OPT, params)
    cfg = DPOConfig(beta=0.1, reference_is_base=True, num_microbatches=2)
    batch = pref_batch(seed=3)
    single = create_train_state(on_device(params), tx, jax.random.key(0))
    for _ in range(2):
        single, m_single = make_dpo_step(model, tx, cfg)(single, batch, None)
    mesh = fsdp_tensor_mesh()
    with jax.set_mesh(mesh):
        shardings = model.param_shardings(mesh)
        from rlhf_jax.train.state import create_sharded_train_state
        state = create_sharded_train_state(jax.device_put(on_device(params), shardings), tx,
                                           jax.random.key(0), mesh, shardings)
        placed = shard_batch(batch, mesh)
        step = make_dpo_step(model, tx, cfg, state_sharding=state_shardings(state),
                             batch_sharding=jax.tree.map(lambda x: x.sharding, placed))
        for _ in range(2):
            state, m = step(state, placed, None)
    a = state.params["trunk"]["blocks"]["attn"]["q"]["lora_a"]
    assert a.sharding.spec == shardings["trunk"]["blocks"]["attn"]["q"]["lora_a"].spec
    assert tuple(a.sharding.spec)[1] == "fsdp"
    assert_tree_close(host(state.params), host(single.params), atol=2e-6)
    for k, v in reduced(m_single).items():
        np.testing.assert_allclose(reduced(m)[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


# ---- checkpoints --------------------------------------------------------------------------
def _sft_dataset():
    from rlhf_jax.data.datasets import SFTDataset
    from rlhf_jax.data.records import DataStats
    from rlhf_jax.data.tokenize import SFTExample
    rs = np.random.RandomState(1)
    examples = []
    for _ in range(10):
        n = int(rs.randint(8, 17))
        examples.append(SFTExample(tokens=rs.randint(3, 64, size=n).astype(np.int32),
                                   loss_mask=np.arange(n) >= n // 2))
    return SFTDataset(examples, [f"ex[{i}]" for i in range(10)], DataStats(source="synthetic"),
                      buckets=(16,), pad_id=0)


def _loop(out_dir, state, step_fn, total=4):
    from rlhf_jax.data.config import BatchConfig
    from rlhf_jax.metrics import MetricsLogger
    from rlhf_jax.train.loop import LoopConfig, run_loop
    logger = MetricsLogger(out_dir, tensorboard=False)
    try:
        return run_loop(stage="sft", step_fn=step_fn, state=state,
                        batches=_sft_dataset().batches(BatchConfig(batch_size=4, buckets=(16,),
                                                                   seed=3, remainder="wrap")),
                        place=lambda b: jax.device_put(b, jax.devices()[0]), out_dir=out_dir,
                        cfg=LoopConfig(total_steps=total, checkpoint_every=2), logger=logger,
                        loss_key="sft/loss", meta={"lora_base": {"from": "initial"}})
    finally:
        logger.close()


def test_checkpoints_hold_the_adapters_and_resume_bit_identically(tmp_path):
    from rlhf_jax.checkpoint import Checkpointer
    model = lora_model(quantize_base="int8")
    params = lora_host_params(quantize_base="int8")
    tx = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=2, schedule="cosine",
                                        total_steps=4), params)
    step = make_sft_step(model, tx)

    def fresh():
        return create_train_state(on_device(params), tx, jax.random.key(0))

    ref = host(_loop(tmp_path / "ref", fresh(), step).state)
    calls = []

    def dies_at_step_4(state, batch):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return step(state, batch)

    with pytest.raises(RuntimeError, match="killed"):
        _loop(tmp_path / "run", fresh(), dies_at_step_4)
    resumed = _loop(tmp_path / "run", fresh(), step)
    assert resumed.step == 4
    jax.tree.map(np.testing.assert_array_equal, host(resumed.state), ref)
    # what the checkpoint holds: adapters + optimizer state + step + key, no base kernel
    with Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
        meta = ckpt.restore_meta()
        stored = ckpt._manager.item_metadata(ckpt.latest_step())["state"]
    names = {"/".join(str(getattr(k, "key", k)) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(
                 stored, is_leaf=lambda x: hasattr(x, "shape"))[0]}
    param_names = {n for n in names if n.startswith("params/")}
    assert param_names and all(n.endswith(("lora_a", "lora_b")) for n in param_names)
    assert not any("kernel" in n or "embed" in n for n in names), sorted(names)[:5]
    assert meta["frozen_base"]["source"] == {"from": "initial"}
    assert list(meta["frozen_base"]["digests"].values()) == [lora.frozen_digest(on_device(params))]
    # a different frozen base is refused by name
    other = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1 if _names(p).endswith("['up']['kernel_scale']") else x, params)
    state = create_train_state(on_device(other), tx, jax.random.key(0))
    with pytest.raises(ValueError, match="trained on another frozen base"):
        _loop(tmp_path / "run", state, step, total=6)
