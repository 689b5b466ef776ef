"""The training stages: SFT -> reward model -> PPO, and DPO from the same SFT model.

Each is registered with the sections of ``PipelineConfig`` its result depends on and the
stages it reads; ``rlhf_jax.pipeline.registry`` is the one list the pipeline, the CLI and the
resume checks use.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.reward import normalization_gain_bias
from rlhf_jax.models.model import Model, Params
from rlhf_jax.pipeline.registry import get_stage, register_stage
from rlhf_jax.pipeline.run import Run, gather_rows, local_rows
from rlhf_jax.rollout.sampler import make_sampler
from rlhf_jax.train.common import sequence_scores
from rlhf_jax.train.dpo import make_dpo_eval, make_dpo_step
from rlhf_jax.train.ppo import init_ppo_state, make_ppo_iteration, ppo_state_shardings
from rlhf_jax.train.reward import make_reward_eval, make_reward_step
from rlhf_jax.train.sft import make_sft_step
from rlhf_jax.types import PromptBatch

log = logging.getLogger(__name__)

_COMMON = ("seed", "task", "policy", "data")


# ---- SFT ----------------------------------------------------------------------------------
@register_stage("sft", sections=(*_COMMON, "sft"),
                description="supervised fine-tuning of the initial policy on demonstrations")
def run_sft(run: Run) -> None:
    """Stage 1: supervised fine-tuning on the task's demonstrations (loss on response tokens,
    every assistant turn, the end-of-turn token included; Ouyang et al. 2022 §3.5)."""
    c = run.cfg.sft
    run.begin(get_stage("sft"))
    model, params = run.initial_policy()
    data = run.sft_dataset()
    tx, state, shardings = run.train_state(model, params, c.optimizer, c.steps, 1)
    step = make_sft_step(model, tx, c.step, state_sharding=shardings,
                         batch_sharding=run.batch_sharding())
    bcfg = run.batch_config(c.batch_size)
    result = run.loop("sft", step, state, run.batches(data, bcfg), c.steps, model,
                      loss_key="sft/loss")
    run.finish_policy("sft", model, result.state.params)


# ---- shared helpers -----------------------------------------------------------------------
def _truncate_trunk(params: Params, n_layers: int) -> Params:
    trunk = dict(params["trunk"])
    trunk["blocks"] = jax.tree.map(lambda x: x[:n_layers], trunk["blocks"])
    return {**params, "trunk": trunk}


def eval_pairs(run: Run, metrics_fn, dataset, max_pairs: int, batch_size: int) -> dict[str, float]:
    """Metrics over the first ``max_pairs`` held-out comparisons (one pass, in order, whole
    batches; every process feeds its rows), reduced from ``(sum, count)`` pairs."""
    bcfg = dataclasses.replace(run.batch_config(batch_size), shuffle=False, num_epochs=1,
                               remainder="drop")
    totals: dict[str, list[float]] = {}
    seen = 0
    for batch in run.batches(dataset, bcfg):
        if seen >= max_pairs:
            break
        m = jax.device_get(metrics_fn(run.place(batch)))
        for k, (s, cnt) in m.items():
            acc = totals.setdefault(k, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(cnt)
        seen += batch_size
    return {k: s / max(cnt, 1.0) for k, (s, cnt) in totals.items()}


def prompt_batches(run: Run, role: str, count: int, batch_size: int):
    """The first ``count`` prompts of ``role`` in order (wrapping if the set is smaller) as
    ``ceil(count / batch_size)`` global batches: this process's rows of each, and the
    response prefixes of the whole global batch."""
    data = run.prompt_dataset(role)
    bcfg = dataclasses.replace(run.batch_config(batch_size), shuffle=False)
    it = run.batches(data, bcfg)
    n = max(1, math.ceil(count / batch_size))
    batches = [next(it) for _ in range(n)]
    prefixes = [data.prefixes[i % len(data)] for i in range(n * batch_size)]
    return batches, prefixes


def _share_frozen(cfg, model: Model):
    """``cfg`` (a ``PPOConfig`` or ``DPOConfig``) with ``reference_shares_frozen_layers`` on
    whenever the policy has frozen layers: the stages' reference is a copy of the policy's
    initial parameters, and the optimizer never moves the frozen part, so the two agree there
    by construction."""
    return dataclasses.replace(cfg, reference_shares_frozen_layers=model.cfg.frozen_layers > 0)


# ---- reward model -------------------------------------------------------------------------
@register_stage("rm", sections=(*_COMMON, "rm", "ppo.ppo.sampling"), inputs=("sft",),
                description="reward model on the SFT trunk, trained on comparisons")
def run_rm(run: Run) -> None:
    """Stage 2: a scalar reward model on the SFT trunk (optionally truncated), trained on the
    task's comparisons (Bradley-Terry / K-way ranking, Ouyang et al. 2022 §3.5), evaluated on
    held-out comparisons, and normalised to mean 0, std 1 on SFT samples (Ziegler et al. 2019
    §2.2; sampled with the PPO rollout's settings)."""
    c, p = run.cfg.rm, run.cfg.policy
    run.begin(get_stage("rm"))
    sft_model, sft_params, _ = run.load_final("sft")
    n_layers = p.reward_layers or sft_model.cfg.n_layers
    rm = Model(dataclasses.replace(sft_model.cfg, n_layers=n_layers,
                                   frozen_layers=p.reward_frozen_layers), kind="scalar")
    params = run.with_head(_truncate_trunk(sft_params, n_layers), rm,
                           jax.random.key(run.cfg.seed + 2))
    num_candidates = 2 if c.step.loss == "pairwise" else None
    data = run.preference_dataset("preferences", num_candidates)
    tx, state, shardings = run.train_state(rm, params, c.optimizer, c.steps, 2)
    evaluate = make_reward_eval(rm, c.step)
    eval_fn = None
    if run.task.has("eval_preferences"):
        eval_data = run.preference_dataset("eval_preferences", num_candidates)

        def eval_fn(state, step):
            return eval_pairs(run, lambda b: evaluate(state.params, b), eval_data, c.eval_pairs,
                              c.batch_size)

    step = make_reward_step(rm, tx, c.step, state_sharding=shardings,
                            batch_sharding=run.batch_sharding())
    bcfg = run.batch_config(c.batch_size, seed_offset=2, num_candidates=num_candidates)
    result = run.loop("rm", step, state, run.batches(data, bcfg), c.steps, rm,
                      loss_key="rm/loss", eval_fn=eval_fn)
    gain, bias = 1.0, 0.0
    if c.normalize_prompts:
        scores = _sft_sample_scores(run, sft_model, sft_params, rm, result.state.params,
                                    c.normalize_prompts)
        gain, bias = (float(x) for x in normalization_gain_bias(jnp.asarray(scores)))
    final_eval = result.records[-1] if result.records else {}
    run.finish("rm", rm, result.state.params,
               {"reward_gain": gain, "reward_bias": bias,
                "heldout_accuracy": final_eval.get("rm/accuracy")})


def _sft_sample_scores(run: Run, sft_model, sft_params, rm, rm_params, count: int) -> np.ndarray:
    """Reward-model scores ``[count']`` of SFT samples on the RL prompts (all processes)."""
    sampler = make_sampler(sft_model, run.sampling(run.cfg.ppo.ppo.sampling))
    score = jax.jit(lambda p, t, pos, m: sequence_scores(rm, p, t, pos, m),
                    out_shardings=run.batch_sharding())
    out = []
    batches, _ = prompt_batches(run, "prompts", count, min(count, 32))
    with jax.set_mesh(run.mesh):
        for i, batch in enumerate(batches):
            b = run.place(batch)
            s = sampler(sft_params, b.tokens, b.attn_mask, jax.random.key(run.cfg.seed + 100 + i))
            out.append(gather_rows(local_rows(score(rm_params, s.tokens, s.positions, s.attn_mask))))
    return np.concatenate(out)


# ---- PPO ----------------------------------------------------------------------------------
@register_stage("ppo", sections=(*_COMMON, "ppo"), inputs=("sft", "rm"),
                description="PPO from the SFT policy against the reward model, KL to SFT")
def run_ppo(run: Run) -> None:
    """Stage 3: PPO from the SFT policy against the (normalised) reward model with a per-token
    KL penalty to the frozen SFT policy (Ouyang et al. 2022 §3.5; Ziegler et al. 2019). The
    value function is a head on the policy trunk, or a separate model initialised from the
    reward model (``ppo.ppo.value_model = "separate"``, InstructGPT's choice)."""
    c = run.cfg.ppo
    run.begin(get_stage("ppo"))
    frozen_layers = run.cfg.policy.frozen_layers
    sft_model, sft_params, _ = run.load_final("sft", frozen_layers=frozen_layers)
    rm, rm_params, rm_meta = run.load_final("rm")
    separate = c.ppo.value_model == "separate"
    policy = Model(sft_model.cfg, kind="lm" if separate else "lm_value")
    params = run.with_head(sft_params, policy, jax.random.key(run.cfg.seed + 3))
    ref_params = jax.tree.map(jnp.copy, params)
    ppo_cfg = dataclasses.replace(
        _share_frozen(c.ppo, policy), reward_gain=rm_meta.get("reward_gain", 1.0),
        reward_bias=rm_meta.get("reward_bias", 0.0), sampling=run.sampling(c.ppo.sampling))
    tx, policy_state, policy_shardings = run.train_state(policy, params, c.optimizer,
                                                         c.iterations, 3)
    value_model = value_tx = value_state = value_shardings = None
    if separate:
        value_model = rm
        value_tx, value_state, value_shardings = run.train_state(
            rm, rm_params, c.value_optimizer, c.iterations, 5)
    state_shardings = ppo_state_shardings(policy_shardings, run.mesh, value_shardings)
    # Built under jit with out_shardings: the controller scalars and the key are born
    # replicated on the (possibly multi-process) mesh, the trained states are moved, not copied.
    state = jax.jit(lambda p, v: init_ppo_state(p, ppo_cfg.kl, jax.random.key(run.cfg.seed + 30),
                                                value=v),
                    out_shardings=state_shardings, donate_argnums=(0, 1))(policy_state, value_state)
    iteration = make_ppo_iteration(
        policy_model=policy, reward_model=rm, policy_tx=tx, cfg=ppo_cfg, value_model=value_model,
        value_tx=value_tx, state_sharding=state_shardings, prompt_sharding=run.batch_sharding(),
        frozen_shardings=(policy.param_shardings(run.mesh), rm.param_shardings(run.mesh)))

    def step(state, batch: PromptBatch, ref, reward):
        return iteration(state, batch.tokens, batch.attn_mask, ref, reward)

    data = run.prompt_dataset("prompts")
    bcfg = run.batch_config(c.batch_size, seed_offset=3)
    result = run.loop("ppo", step, state, run.batches(data, bcfg), c.iterations, policy,
                      frozen=(ref_params, rm_params), loss_key="ppo/loss/total")
    run.finish_policy("ppo", policy, result.state.policy.params)


# ---- DPO ----------------------------------------------------------------------------------
@register_stage("dpo", sections=(*_COMMON, "dpo"), inputs=("sft",),
                description="DPO from the SFT policy on the comparisons, SFT as reference")
def run_dpo(run: Run) -> None:
    """Stage 4: DPO (or a family member, ``dpo.dpo.loss_type``) from the SFT policy on the
    task's comparisons with the frozen SFT policy as reference (Rafailov et al. 2023)."""
    c = run.cfg.dpo
    run.begin(get_stage("dpo"))
    model, sft_params, _ = run.load_final("sft", frozen_layers=run.cfg.policy.frozen_layers)
    # SimPO / ORPO use no reference: no second copy of the model then.
    ref_params = jax.tree.map(jnp.copy, sft_params) if c.dpo.needs_reference else None
    data = run.preference_dataset("preferences", 2)
    tx, state, shardings = run.train_state(model, sft_params, c.optimizer, c.steps, 4)
    dpo_cfg = _share_frozen(c.dpo, model)
    evaluate = make_dpo_eval(model, dpo_cfg)
    eval_fn = None
    if run.task.has("eval_preferences"):
        eval_data = run.preference_dataset("eval_preferences", 2)

        def eval_fn(state, step):
            return eval_pairs(run, lambda b: evaluate(state.params, ref_params, b), eval_data,
                              c.eval_pairs, c.batch_size)

    step = make_dpo_step(model, tx, dpo_cfg, state_sharding=shardings,
                         batch_sharding=run.batch_sharding(),
                         frozen_sharding=None if ref_params is None else model.param_shardings(run.mesh))
    bcfg = run.batch_config(c.batch_size, seed_offset=4, num_candidates=2)
    result = run.loop("dpo", step, state, run.batches(data, bcfg), c.steps, model,
                      frozen=(ref_params,), loss_key="dpo/loss", eval_fn=eval_fn)
    run.finish_policy("dpo", model, result.state.params)
