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
from rlhf_jax.rewards import RewardSum, load_reward
from rlhf_jax.rollout.groups import concat_rounds, informative_groups, select_groups
from rlhf_jax.rollout.postprocess import decode
from rlhf_jax.rollout.sampler import make_sampler
from rlhf_jax.train.common import sequence_scores
from rlhf_jax.train.dpo import make_dpo_eval, make_dpo_step
from rlhf_jax.train.ppo import (PPOStages, init_ppo_state, make_ppo_iteration, policy_forward,
                                ppo_state_shardings)
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


# ---- PPO and the critic-free RL family ----------------------------------------------------
def _rl_inputs(cfg) -> tuple[str, ...]:
    """What the RL stage reads: SFT (unless it starts from the initial policy) and the reward
    model (unless its weight is 0)."""
    c = cfg.ppo
    return tuple(n for n, used in (("sft", c.init == "sft"), ("rm", c.reward_model_weight != 0))
                 if used)


def rl_reward(run: Run) -> RewardSum:
    """The RL stage's reward: the reward model (weight ``ppo.reward_model_weight``), the
    task's own rewards (``ppo.task_rewards``) and every ``ppo.rewards`` function, summed.

    Raises:
      ValueError: no source at all, or a ``--reward`` that cannot be loaded.
    """
    c = run.cfg.ppo
    functions = list(run.task.rewards) if c.task_rewards else []
    functions += [load_reward(spec) for spec in c.rewards]
    return RewardSum(functions, model_weight=c.reward_model_weight)


@register_stage("ppo", sections=(*_COMMON, "ppo"), inputs=("sft", "rm"),
                select_inputs=_rl_inputs,
                description="on-policy RL (PPO, GRPO, RLOO, ...) from the SFT policy, KL to it")
def run_ppo(run: Run) -> None:
    """Stage 3: on-policy RL from the SFT (or initial) policy against the reward: the
    normalised reward model and any host reward functions, with a KL penalty to the frozen
    starting policy (Ouyang et al. 2022 §3.5; Ziegler et al. 2019). ``ppo.ppo.advantage``
    picks PPO (GAE with a value function: a head on the policy trunk, or a separate model
    initialised from the reward model, InstructGPT's choice) or a critic-free, group-sampled
    estimator (GRPO, RLOO, ...). With host rewards or dynamic sampling the iteration runs
    staged (sample on device, reward on the host, learn on device); otherwise it is one
    jitted function."""
    c = run.cfg.ppo
    run.begin(get_stage("ppo"))
    frozen_layers = run.cfg.policy.frozen_layers
    if c.init == "sft":
        start_model, start_params, _ = run.load_final("sft", frozen_layers=frozen_layers)
    else:
        start_model, start_params = run.initial_policy()
    reward = rl_reward(run)
    rm = rm_params = None
    rm_meta: dict = {}
    if reward.model_weight:
        rm, rm_params, rm_meta = run.load_final("rm")
    critic = c.ppo.needs_critic
    separate = critic and c.ppo.value_model == "separate"
    policy = Model(start_model.cfg, kind="lm_value" if critic and not separate else "lm")
    params = run.with_head(start_params, policy, jax.random.key(run.cfg.seed + 3))
    ref_params = jax.tree.map(jnp.copy, params) if c.ppo.uses_reference else None
    gain, bias = rm_meta.get("reward_gain", 1.0), rm_meta.get("reward_bias", 0.0)
    staged = bool(reward.functions) or c.dynamic_sampling
    w = reward.model_weight
    ppo_cfg = dataclasses.replace(
        _share_frozen(c.ppo, policy), sampling=run.sampling(c.ppo.sampling),
        # fused: the weighted, normalised RM score is applied inside the step; staged: on the host
        reward_gain=1.0 if staged else w * gain, reward_bias=0.0 if staged else w * bias)
    # one optimizer update per minibatch: the learning-rate schedule spans all of them
    updates = c.iterations * c.ppo.num_ppo_epochs * c.ppo.num_minibatches
    tx, policy_state, policy_shardings = run.train_state(policy, params, c.optimizer, updates, 3)
    value_model = value_tx = value_state = value_shardings = None
    if separate:
        if rm is None:
            raise ValueError("ppo.ppo.value_model='separate' initialises the value model from the "
                             "reward model; it needs ppo.reward_model_weight != 0 (or use "
                             "value_model='shared')")
        value_model = rm
        value_tx, value_state, value_shardings = run.train_state(
            rm, rm_params, c.value_optimizer, updates, 5)
    state_shardings = ppo_state_shardings(policy_shardings, run.mesh, value_shardings)
    # Built under jit with out_shardings: the controller scalars and the key are born
    # replicated on the (possibly multi-process) mesh, the trained states are moved, not copied.
    state = jax.jit(lambda p, v: init_ppo_state(p, ppo_cfg.kl, jax.random.key(run.cfg.seed + 30),
                                                value=v),
                    out_shardings=state_shardings, donate_argnums=(0, 1))(policy_state, value_state)
    ref_sharding = policy.param_shardings(run.mesh) if ref_params is not None else None
    data = run.prompt_dataset("prompts")
    bcfg = run.batch_config(c.batch_size, seed_offset=3)
    if staged:
        step = _staged_rl_step(run, policy, tx, ppo_cfg, value_model, value_tx, state_shardings,
                               ref_sharding, reward, rm, (gain, bias), data, bcfg)
    else:
        iteration = make_ppo_iteration(
            policy_model=policy, reward_model=rm, policy_tx=tx, cfg=ppo_cfg,
            value_model=value_model, value_tx=value_tx, state_sharding=state_shardings,
            prompt_sharding=run.batch_sharding(),
            frozen_shardings=(ref_sharding, rm.param_shardings(run.mesh)))

        def step(state, batch: PromptBatch, ref, reward_params):
            return iteration(state, batch.tokens, batch.attn_mask, ref, reward_params)

    probe = None
    if c.probe_every:
        probe_ref = ref_params if ref_params is not None else jax.tree.map(jnp.copy, params)
        probe = gold_proxy_probe(run, policy, probe_ref, rm and (rm, rm_params, rm_meta))
        ckpts = run.files("ppo").checkpoints
        if not (ckpts.exists() and any(ckpts.iterdir())):  # a fresh start: the step-0 point
            run.logger.drop_after(-1, "ppo_eval")
            run.logger.log(0, probe(state, 0), stage="ppo_eval")
    result = run.loop("ppo", step, state, run.batches(data, bcfg), c.iterations, policy,
                      frozen=(ref_params, rm_params), loss_key="ppo/loss/total", eval_fn=probe,
                      eval_every=c.probe_every or 0)
    run.finish_policy("ppo", policy, result.state.policy.params)


def gold_proxy_probe(run: Run, policy: Model, ref_params, rm):
    """The RL stage's gold-vs-proxy probe ``(state, step) -> metrics`` (``ppo.probe_every``).

    Samples the policy in ``state`` on the first ``ppo.probe_prompts`` held-out prompts with
    the RL sampling settings and the same key every time, then reports means over the probe
    set: ``gold/score`` (``Task.gold_score``), ``proxy/score`` (the reward model's score with
    the stage's normalisation; absent without a reward model), ``probe/kl`` (nats per
    sequence, ``log pi - log pi_ref`` summed over the response and averaged over samples,
    an unbiased estimate of KL(pi || pi_ref) of the sampled distributions) and
    ``probe/sqrt_kl``. Gao et al. 2023 plot gold and proxy against ``sqrt(KL)``.

    Args:
      ref_params: the starting policy's parameters (KL is measured to it).
      rm: ``(reward model, params, meta with reward_gain/reward_bias)`` or ``None``.
    """
    from rlhf_jax.pipeline.evaluate import _sample_policy

    c = run.cfg.ppo
    role = "eval_prompts" if run.task.has("eval_prompts") else "prompts"
    count = c.probe_prompts or 64
    batches, prefixes = prompt_batches(run, role, count, run.cfg.eval.batch_size)
    columns = run.prompt_dataset(role).columns
    sampling = run.sampling(c.ppo.sampling)
    sampler = make_sampler(policy, sampling)
    logp_fn = jax.jit(policy_forward, static_argnames=("model", "prompt_len", "sampling"))
    score_fn = jax.jit(sequence_scores, static_argnames=("model",))

    def probe(state, step):
        rows, _ = _sample_policy(run, policy, state.policy.params, (policy, ref_params), rm,
                                 batches, prefixes, columns, sampling, sampler, logp_fn,
                                 score_fn, key_offset=7000, gold=True)
        rows = {k: v[:count] for k, v in rows.items()}
        kl = float(np.mean(rows["kl"]))
        out = {"probe/kl": kl, "probe/sqrt_kl": float(np.sqrt(max(kl, 0.0)))}
        if "judge" in rows:
            out["gold/score"] = float(np.mean(rows["judge"]))
        if "rm" in rows:
            out["proxy/score"] = float(np.mean(rows["rm"]))
        return out

    return probe


def _staged_rl_step(run: Run, policy: Model, tx, ppo_cfg, value_model, value_tx,
                    state_shardings, ref_sharding, reward: RewardSum, rm, gain_bias, data, bcfg):
    """The staged RL step ``(state, batch, ref, reward_params) -> (state, metrics)``: sample
    ``k`` responses per prompt (device), decode this process's rows and score them with the
    reward sources (host), optionally refill the batch with informative groups (dynamic
    sampling), then learn (device)."""
    c = run.cfg.ppo
    k = ppo_cfg.num_samples
    rows_sharding = run.batch_sharding()
    stages = PPOStages(policy_model=policy, policy_tx=tx, cfg=ppo_cfg, value_model=value_model,
                       value_tx=value_tx, state_sharding=state_shardings,
                       row_sharding=rows_sharding, ref_sharding=ref_sharding)
    score_fn = None
    if rm is not None:
        score_fn = jax.jit(lambda p, t, pos, m: sequence_scores(rm, p, t, pos, m),
                           out_shardings=rows_sharding)
    gain, bias = gain_bias
    r_len = ppo_cfg.sampling.max_new_tokens

    def score_round(state, prompts: PromptBatch, reward_params):
        out, tokens, attn, positions = stages.generate(state, prompts.tokens, prompts.attn_mask)
        p_len = tokens.shape[1] - r_len
        local_tokens, local_attn = local_rows(tokens), local_rows(attn)
        response_mask = local_rows(out.response_mask)
        index = np.repeat(local_rows(prompts.index), k)
        prompt_texts = decode(run.tokenizer, local_tokens[:, :p_len], local_attn[:, :p_len])
        responses = [data.prefixes[i] + t for i, t in
                     zip(index, decode(run.tokenizer, local_tokens[:, p_len:], response_mask))]
        columns = {name: [col[i] for i in index] for name, col in data.columns.items()}
        model_scores = None
        if score_fn is not None:
            model_scores = local_rows(score_fn(reward_params, tokens, positions, attn)) * gain + bias
        total, metrics = reward(prompt_texts, responses, columns, model_scores)
        rows = {"tokens": local_tokens, "attn_mask": local_attn, "response_mask": response_mask,
                "ended": local_rows(out.ended), "scores": total.astype(np.float32)}
        return rows, metrics

    def step(state, batch: PromptBatch, ref, reward_params):
        rounds, metrics = [], {}
        prompts = batch
        local_groups = len(local_rows(batch.index))
        for r in range(c.max_sampling_rounds if c.dynamic_sampling else 1):
            rows, m = score_round(state, prompts, reward_params)
            rounds.append(rows)
            for name, (total, count) in m.items():
                prev = metrics.get(name, (0.0, 0.0))
                metrics[name] = (prev[0] + total, prev[1] + count)
            if not c.dynamic_sampling:
                break
            found = sum(int(informative_groups(x["scores"], k).sum()) for x in rounds)
            # every process samples the same number of rounds (the sampler is collective)
            if gather_rows(np.asarray([found >= local_groups])).all():
                break
            if r + 1 < c.max_sampling_rounds:  # refill prompts: a stream seeded by step and round
                step_no = int(jax.device_get(state.policy.step))
                refill = dataclasses.replace(bcfg, seed=bcfg.seed + 1_000_003 * (step_no + 1) + r)
                prompts = run.place(next(iter(run.batches(data, refill))))
        rows = concat_rounds(rounds, r_len)
        if c.dynamic_sampling:
            rows, ds = select_groups(rows, k, local_groups)
            metrics.update({name: (v, 1.0) for name, v in ds.items()})
        rows["positions"] = np.maximum(np.cumsum(rows["attn_mask"], axis=1) - 1, 0).astype(np.int32)
        placed = run.place(rows)
        state, learn_metrics = stages.learn(state, placed["tokens"], placed["attn_mask"],
                                            placed["positions"], placed["response_mask"],
                                            placed["ended"], placed["scores"], ref)
        return state, {**learn_metrics, **metrics}

    return step


# ---- DPO ----------------------------------------------------------------------------------
def _dpo_training_data(run: Run, dpo_cfg):
    """The DPO stage's training set: the task's comparisons, or its ``unpaired`` examples for an
    unpaired loss (KTO), whose label balance is logged against the paper's advice."""
    if not dpo_cfg.unpaired:
        return run.preference_dataset("preferences", 2)
    data = run.unpaired_dataset("unpaired")
    n_d, n_u = data.num_desirable, data.num_undesirable
    ratio = dpo_cfg.desirable_weight * n_d / max(dpo_cfg.undesirable_weight * n_u, 1)
    log.info("dpo: %s on %d desirable and %d undesirable examples; lambda_D n_D / (lambda_U "
             "n_U) = %.3f (Ethayarajh et al. 2024 section 4 recommend [1, 4/3])",
             dpo_cfg.loss_type, n_d, n_u, ratio)
    if not (n_d and n_u):
        log.warning("dpo: the unpaired data has only %s examples",
                    "desirable" if n_d else "undesirable")
    return data


@register_stage("dpo", sections=(*_COMMON, "dpo"), inputs=("sft",),
                description="DPO from the SFT policy on the comparisons, SFT as reference")
def run_dpo(run: Run) -> None:
    """Stage 4: DPO (or a family member, ``dpo.dpo.loss_type``) from the SFT policy on the
    task's comparisons with the frozen SFT policy as reference (Rafailov et al. 2023). An
    unpaired loss (KTO, Ethayarajh et al. 2024) trains on the task's ``unpaired`` examples
    instead; held-out comparisons evaluate every loss by its implicit reward."""
    c = run.cfg.dpo
    run.begin(get_stage("dpo"))
    model, sft_params, _ = run.load_final("sft", frozen_layers=run.cfg.policy.frozen_layers)
    # SimPO / ORPO use no reference: no second copy of the model then.
    ref_params = jax.tree.map(jnp.copy, sft_params) if c.dpo.needs_reference else None
    data = _dpo_training_data(run, c.dpo)
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
    bcfg = run.batch_config(c.batch_size, seed_offset=4,
                            num_candidates=None if dpo_cfg.unpaired else 2)
    result = run.loop("dpo", step, state, run.batches(data, bcfg), c.steps, model,
                      frozen=(ref_params,), loss_key="dpo/loss", eval_fn=eval_fn)
    run.finish_policy("dpo", model, result.state.params)
