"""The training stages: SFT -> reward model -> PPO, and DPO from the same SFT model.

Each is registered with the sections of ``PipelineConfig`` its result depends on and the
stages it reads; ``rlhf_jax.pipeline.registry`` is the one list the pipeline, the CLI and the
resume checks use.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.ensemble import aggregate, get_aggregation, member_std, warm_average
from rlhf_jax.losses.reward import normalization_gain_bias
from rlhf_jax.models.model import Model, Params
from rlhf_jax.pipeline.registry import get_stage, register_stage
from rlhf_jax.pipeline.refresh import Refresher, refresh_params
from rlhf_jax.pipeline.run import Run, fit_schedule, gather_rows, local_rows, truncate_trunk
from rlhf_jax.rewards import RewardSum, load_reward
from rlhf_jax.rollout.groups import concat_rounds, informative_groups, select_groups
from rlhf_jax.rollout.postprocess import decode
from rlhf_jax.rollout.sampler import make_sampler
from rlhf_jax.train.common import sequence_scores
from rlhf_jax.train.dpo import make_dpo_eval, make_dpo_step
from rlhf_jax.train.ppo import (PPOStages, init_ppo_state, make_ppo_iteration, policy_forward,
                                ppo_state_shardings)
from rlhf_jax.train.reward import make_reward_eval, make_reward_step
from rlhf_jax.train.reward_ensemble import (EnsembleConfig, create_ensemble_state,
                                            ensemble_param_shardings, ensemble_sequence_scores,
                                            ensemble_state_shardings, heads_model,
                                            init_ensemble_params, init_heads,
                                            make_ensemble_reward_eval, make_ensemble_reward_step,
                                            make_multihead_reward_eval,
                                            make_multihead_reward_step, member,
                                            multihead_sequence_scores)
from rlhf_jax.train.sft import make_sft_step
from rlhf_jax.train.state import make_optimizer
from rlhf_jax.types import PromptBatch

log = logging.getLogger(__name__)

_COMMON = ("seed", "task", "policy", "data")


# ---- SFT ----------------------------------------------------------------------------------
@register_stage("sft", sections=(*_COMMON, "sft"),
                description="supervised fine-tuning of the initial policy on demonstrations")
def run_sft(run: Run) -> None:
    """Stage 1: supervised fine-tuning on the task's demonstrations (loss on response tokens,
    every assistant turn, the end-of-turn token included; Ouyang et al. 2022 §3.5). With
    ``policy.lora``: adapters on the initial policy as the frozen base."""
    c = run.cfg.sft
    run.begin(get_stage("sft"))
    model, params = run.start_lora("sft", *run.initial_policy(), 101, base_from="initial")
    data = run.sft_dataset()
    tx, state, shardings = run.train_state(model, params, c.optimizer, c.steps, 1)
    step = make_sft_step(model, tx, c.step, state_sharding=shardings,
                         batch_sharding=run.batch_sharding())
    bcfg = run.batch_config(c.batch_size)
    result = run.loop("sft", step, state, run.batches(data, bcfg), c.steps, model,
                      loss_key="sft/loss")
    run.finish_policy("sft", model, result.state.params)


# ---- shared helpers -----------------------------------------------------------------------
_truncate_trunk = truncate_trunk


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
    by construction. With LoRA ``reference_is_base`` is on as well: the reference is the
    policy's frozen base (the adapters off), never a copy."""
    return dataclasses.replace(cfg, reference_shares_frozen_layers=model.cfg.frozen_layers > 0,
                               reference_is_base=model.cfg.lora is not None)


# ---- reward model -------------------------------------------------------------------------
@register_stage("rm", sections=(*_COMMON, "rm", "ppo.ppo.sampling"), inputs=("sft",),
                description="reward model on the SFT trunk, trained on comparisons")
def run_rm(run: Run) -> None:
    """Stage 2: a scalar reward model on the SFT trunk (optionally truncated), trained on the
    task's comparisons (Bradley-Terry / K-way ranking, Ouyang et al. 2022 §3.5), evaluated on
    held-out comparisons, and normalised to mean 0, std 1 on SFT samples (Ziegler et al. 2019
    §2.2; sampled with the PPO rollout's settings). With ``rm.ensemble = K``: K reward models
    trained together on the same batches (``_run_rm_ensemble``). With ``policy.lora``: the
    SFT model (its adapters merged, truncated) is the frozen base; fresh adapters and the
    scalar head train."""
    c, p = run.cfg.rm, run.cfg.policy
    run.begin(get_stage("rm"))
    if c.ensemble and run.lora is not None:
        raise ValueError(f"rm.ensemble={c.ensemble} with policy.lora (rank "
                         f"{run.lora.rank}) is not supported: train one LoRA reward model, or "
                         "an ensemble without LoRA")
    sft_model, sft_params = run.merged(*run.load_final("sft")[:2])
    n_layers = p.reward_layers or sft_model.cfg.n_layers
    rm = Model(dataclasses.replace(sft_model.cfg, n_layers=n_layers,
                                   frozen_layers=p.reward_frozen_layers), kind="scalar")
    trunk_params = _truncate_trunk(sft_params, n_layers)
    num_candidates = 2 if c.step.loss == "pairwise" else None
    data = run.preference_dataset("preferences", num_candidates)
    eval_data = (run.preference_dataset("eval_preferences", num_candidates)
                 if run.task.has("eval_preferences") else None)
    bcfg = run.batch_config(c.batch_size, seed_offset=2, num_candidates=num_candidates)
    if c.ensemble:
        _run_rm_ensemble(run, sft_model, sft_params, rm, trunk_params, data, eval_data, bcfg)
        return
    params = run.with_head(trunk_params, rm, jax.random.key(run.cfg.seed + 2))
    rm, params = run.start_lora("rm", rm, params, 102, base_from="sft", n_layers=n_layers)
    tx, state, shardings = run.train_state(rm, params, c.optimizer, c.steps, 2)
    evaluate = make_reward_eval(rm, c.step)
    eval_fn = None
    if eval_data is not None:
        def eval_fn(state, step):
            return eval_pairs(run, lambda b: evaluate(state.params, b), eval_data, c.eval_pairs,
                              c.batch_size)

    step = make_reward_step(rm, tx, c.step, state_sharding=shardings,
                            batch_sharding=run.batch_sharding())
    result = run.loop("rm", step, state, run.batches(data, bcfg), c.steps, rm,
                      loss_key="rm/loss", eval_fn=eval_fn)
    gain, bias = 1.0, 0.0
    if c.normalize_prompts:
        scores = _sft_sample_scores(
            run, sft_model, sft_params, lambda q, t, pos, m: sequence_scores(rm, q, t, pos, m),
            (result.state.params,), c.normalize_prompts)
        gain, bias = (float(x) for x in normalization_gain_bias(jnp.asarray(scores)))
    final_eval = result.records[-1] if result.records else {}
    run.finish("rm", rm, result.state.params,
               {"reward_gain": gain, "reward_bias": bias,
                "heldout_accuracy": final_eval.get("rm/accuracy")})


def _run_rm_ensemble(run: Run, sft_model: Model, sft_params: Params, rm: Model,
                     trunk_params: Params, data, eval_data, bcfg) -> None:
    """The ``rm`` stage with ``rm.ensemble = K`` members (``rlhf_jax.train.reward_ensemble``):
    the single reward model's data, batches, held-out evaluation and loop, one vmapped step
    for all members.

    * ``rm.ensemble_trunk = "separate"``: K scalar models on copies of the (truncated) SFT
      trunk, heads drawn from ``fold_in(key(seed + 2), k)``, every member trained like the
      single model (its frozen layers included); saved params ``[K, ...]`` on every leaf.
    * ``"shared"``: K heads on the SFT trunk, which is frozen whole and run once per batch;
      saved params ``{"trunk": [...], "value_head": [K, ...]}``.

    Members see the batch through per-member bootstrap weights (``rm.bootstrap``). Logged:
    ``rm/loss`` / ``rm/accuracy`` pooled over members, ``rm/member{k}/...`` each member's and
    ``rm/ensemble/...`` the ``mean`` of the members' raw scores (training and held-out), and
    ``rm/ensemble/std``, the between-member std of the raw scores. ``heldout_accuracy`` is
    the ensemble's (``rm/ensemble/accuracy``), ``member_heldout_accuracy`` each member's.

    Normalisation (Ziegler et al. 2019 §2.2, ``rm.normalize_prompts``): every member, and the
    WARM weight average (Ramé et al. 2024 §3; ``warm_reward_params``), gets its own gain/bias
    mapping its scores of the same SFT samples to mean 0, std 1: members trained apart differ
    in offset and scale, which ``min`` or the between-member std would otherwise read as
    disagreement (Coste et al. 2023 normalise each member too). ``model.json`` records
    ``ensemble``, ``ensemble_trunk``, ``reward_gain`` / ``reward_bias`` (lists of K),
    ``warm_gain`` / ``warm_bias``.
    """
    c = run.cfg.rm
    k = c.ensemble
    trunk_kind = c.ensemble_trunk or "separate"
    shared = trunk_kind == "shared"
    ecfg = EnsembleConfig(reward=c.step, num_members=k, bootstrap=c.bootstrap or "poisson")
    rng = jax.random.key(run.cfg.seed + 2)
    member_shardings = ensemble_param_shardings(rm, run.mesh)
    trunk_sharding = {"trunk": rm.param_shardings(run.mesh)["trunk"]}
    frozen: tuple = ()
    with jax.set_mesh(run.mesh):
        if shared:
            frozen = (jax.device_put({"trunk": trunk_params["trunk"]}, trunk_sharding),)
            trained_shardings = {"value_head": member_shardings["value_head"]}
            params = init_heads(rm, k, rng, out_shardings=trained_shardings)
        else:
            trained_shardings = member_shardings
            params = init_ensemble_params(rm, trunk_params, k, rng, out_shardings=member_shardings)
    tx, state, shardings = _ensemble_train_state(
        run, params, trained_shardings, c.optimizer, c.steps, 2,
        frozen_layers=0 if shared else rm.cfg.frozen_layers)
    if shared:
        step = make_multihead_reward_step(rm, tx, ecfg, state_sharding=shardings,
                                          batch_sharding=run.batch_sharding(),
                                          trunk_sharding=trunk_sharding)
        evaluate = make_multihead_reward_eval(rm, ecfg)
    else:
        step = make_ensemble_reward_step(rm, tx, ecfg, state_sharding=shardings,
                                         batch_sharding=run.batch_sharding())
        evaluate = make_ensemble_reward_eval(rm, ecfg)
    eval_fn = None
    if eval_data is not None:
        def eval_fn(state, step):
            return eval_pairs(run, lambda b: evaluate(state.params, b, *frozen), eval_data,
                              c.eval_pairs, c.batch_size)

    result = run.loop("rm", step, state, run.batches(data, bcfg), c.steps, rm, frozen=frozen,
                      loss_key="rm/loss", eval_fn=eval_fn)
    params = {**frozen[0], **result.state.params} if shared else result.state.params
    warm = warm_reward_params(run, rm, params, trunk_kind)
    gains, biases = [1.0] * (k + 1), [0.0] * (k + 1)
    if c.normalize_prompts:
        scorer_model = scoring_model(rm, trunk_kind)

        def score(q, w, t, pos, m):  # [B, K + 1]: the members, then the WARM average
            members = ensemble_raw_scores(scorer_model, trunk_kind, q, t, pos, m)
            return jnp.concatenate([members, sequence_scores(rm, w, t, pos, m)[None]]).T
        scores = _sft_sample_scores(run, sft_model, sft_params, score, (params, warm),
                                    c.normalize_prompts)
        pairs = [normalization_gain_bias(jnp.asarray(scores[:, j])) for j in range(k + 1)]
        gains, biases = ([float(x[i]) for x in pairs] for i in (0, 1))
    final_eval = result.records[-1] if result.records else {}
    members_acc = [final_eval.get(f"rm/member{j}/accuracy") for j in range(k)]
    run.finish("rm", rm, params,
               {"ensemble": k, "ensemble_trunk": trunk_kind, "bootstrap": ecfg.bootstrap,
                "reward_gain": gains[:k], "reward_bias": biases[:k],
                "warm_gain": gains[k], "warm_bias": biases[k],
                "heldout_accuracy": final_eval.get("rm/ensemble/accuracy"),
                "member_heldout_accuracy": members_acc if final_eval else None})


def _ensemble_train_state(run: Run, params: Params, param_shardings, opt, total_steps: int,
                          seed_offset: int, *, frozen_layers: int):
    """``(tx, state, state_shardings)`` of stacked ``[K, ...]`` ``params`` (as
    ``Run.train_state`` for one model): ``tx`` built for one member (its frozen-layer and
    weight-decay masks per member tree), the state born sharded with the member axis
    replicated (``ensemble_state_shardings``); ``params`` is donated."""
    opt = fit_schedule(opt, total_steps)
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
    tx = make_optimizer(opt, one, frozen_layers=frozen_layers)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings = ensemble_state_shardings(param_shardings, tx, abstract, run.mesh)
    with jax.set_mesh(run.mesh):
        state = jax.jit(lambda q, r: create_ensemble_state(q, tx, r), out_shardings=shardings,
                        donate_argnums=(0,))(params, jax.random.key(run.cfg.seed + seed_offset))
    return tx, state, shardings


def _sft_sample_scores(run: Run, sft_model, sft_params, score: Callable, score_params: tuple,
                       count: int) -> np.ndarray:
    """Reward-model scores ``[count', ...]`` of SFT samples on the RL prompts (all processes):
    ``score(*score_params, tokens, positions, attn_mask) -> [B, ...]`` (rows first) on every
    sampled batch."""
    sampler = make_sampler(sft_model, run.sampling(run.cfg.ppo.ppo.sampling))
    score_fn = jax.jit(score, out_shardings=run.batch_sharding())
    out = []
    batches, _ = prompt_batches(run, "prompts", count, min(count, 32))
    with jax.set_mesh(run.mesh):
        for i, batch in enumerate(batches):
            b = run.place(batch)
            s = sampler(sft_params, b.tokens, b.attn_mask, jax.random.key(run.cfg.seed + 100 + i))
            out.append(gather_rows(local_rows(score_fn(*score_params, s.tokens, s.positions,
                                                       s.attn_mask))))
    return np.concatenate(out)


# ---- reward-model ensembles: scoring ------------------------------------------------------
def scoring_model(rm: Model, trunk_kind: str) -> Model:
    """The model ``ensemble_raw_scores`` runs: ``rm`` itself for ``"separate"`` members,
    ``heads_model(rm)`` (every layer frozen: the trunk runs once) for ``"shared"``. Build it
    outside any trace (a ``Model`` is built eagerly, which fails under an active mesh)."""
    return heads_model(rm) if trunk_kind == "shared" else rm


def ensemble_raw_scores(model: Model, trunk_kind: str, params: Params, tokens: jax.Array,
                        positions: jax.Array, attn_mask: jax.Array) -> jax.Array:
    """Every member's raw score ``[K, B]`` float32 (reward units, before normalisation) of
    sequences ``[B, T]``, from an ensemble's stacked params (``artifacts.load_final``):
    ``trunk_kind="separate"``: K full models (``ensemble_sequence_scores``); ``"shared"``: K
    heads on one trunk, which runs once (``multihead_sequence_scores``). ``model`` is
    ``scoring_model(rm, trunk_kind)``."""
    if trunk_kind == "shared":
        return multihead_sequence_scores(model, {"value_head": params["value_head"]},
                                         {"trunk": params["trunk"]}, tokens, positions, attn_mask)
    return ensemble_sequence_scores(model, params, tokens, positions, attn_mask)


def warm_reward_params(run: Run, rm: Model, params: Params, trunk_kind: str) -> Params:
    """WARM (Ramé et al. 2024 §3): one scalar reward model ``rm``'s params, the uniform
    average ``(1/K) Σ_k φ_k`` of an ensemble's stacked params (``"shared"``: the trunk as it
    is, the K heads averaged). Computed under jit straight into ``rm``'s shardings."""
    shardings = rm.param_shardings(run.mesh)
    with jax.set_mesh(run.mesh):
        if trunk_kind == "shared":
            head = jax.jit(warm_average, out_shardings=shardings["value_head"])(params["value_head"])
            return {"trunk": params["trunk"], "value_head": head}
        return jax.jit(warm_average, out_shardings=shardings)(params)


def ensemble_member_params(params: Params, meta: dict, k: int) -> Params:
    """Member ``k``'s params (one scalar model) of an ensemble's stacked params; ``meta`` is
    the ``rm`` stage's ``model.json`` (its ``ensemble_trunk``)."""
    if (meta.get("ensemble_trunk") or "separate") == "shared":
        return {"trunk": params["trunk"], "value_head": member(params["value_head"], k)}
    return member(params, k)


@dataclasses.dataclass(frozen=True)
class RewardModelScorer:
    """The reward model as RL, the gold-vs-proxy probe and the evaluation use it: normalised
    and, for an ensemble, aggregated.

    Attributes:
      model: the scalar reward model (one member's architecture for an ensemble).
      params: its params: one model's (a single RM, or the WARM average), or an ensemble's
        stacked ones (``artifacts.load_final``).
      meta: the ``rm`` stage's ``model.json`` (WARM: with ``reward_gain`` / ``reward_bias``
        replaced by the average's ``warm_gain`` / ``warm_bias``).
      fn: jitted ``(params, tokens, positions, attn_mask [B, T]) -> {"score": [B]}`` float32,
        rows sharded like the batch: ``gain * s + bias`` for one model; for an ensemble
        ``aggregate(gain_k * s_kb + bias_k)`` over members plus ``"std": [B]``, the
        between-member std of the normalised scores (population, ddof 0).
      ensemble: K for an aggregated ensemble; ``None`` for one model (WARM included).
      aggregation: the aggregation's name (``None`` for one model).
      gain, bias: the normalisation: floats for one model, K-tuples for an ensemble.
    """

    model: Model
    params: Params
    meta: dict
    fn: Callable
    ensemble: int | None
    aggregation: str | None
    gain: float | tuple
    bias: float | tuple

    def __call__(self, tokens, positions, attn_mask, params=None) -> dict[str, jax.Array]:
        """``fn`` with ``params`` (default: ``self.params``)."""
        return self.fn(self.params if params is None else params, tokens, positions, attn_mask)


def reward_model_scorer(run: Run, rm: Model, params: Params, meta: dict, *,
                        aggregation: str | None = None,
                        coef: float | None = None) -> RewardModelScorer:
    """The normalised (and aggregated) reward-model score of the ``rm`` stage's output.

    One reward model: ``r_b = gain * s_b + bias`` (``reward_gain`` / ``reward_bias`` of
    ``meta``; Ziegler et al. 2019 §2.2). An ensemble (``meta["ensemble"] = K``):
    ``aggregation="warm"`` replaces the members by their weight average (WARM, Ramé et al.
    2024 §3; ``warm_reward_params``) with its own ``warm_gain`` / ``warm_bias``, after which it
    is one reward model; any other aggregation (``rlhf_jax.losses.ensemble.AGGREGATIONS``,
    Coste et al. 2023 §3) normalises each member first, ``s'_kb = gain_k s_kb + bias_k``,
    then aggregates over k (``λ = coef`` for ``mean_minus_*``), in one jitted function that
    also returns the between-member std of ``s'``.

    Args:
      rm, params, meta: ``run.load_final("rm")``.
      aggregation: default ``ppo.reward_aggregation`` (``None``: ``"mean"``).
      coef: ``λ >= 0``; default ``ppo.reward_uncertainty_coef`` (``None``: 1.0).

    Raises:
      ValueError: an unknown aggregation, or an ensemble whose ``model.json`` lacks K
        gains / biases (names the field).
    """
    c = run.cfg.ppo
    aggregation = aggregation or c.reward_aggregation or "mean"
    coef = coef if coef is not None else (c.reward_uncertainty_coef
                                          if c.reward_uncertainty_coef is not None else 1.0)
    if aggregation != "warm":
        get_aggregation(aggregation)  # raises on an unknown name
    k = meta.get("ensemble")
    rows = run.batch_sharding()
    if not k or aggregation == "warm":
        if k:
            params = warm_reward_params(run, rm, params, meta.get("ensemble_trunk") or "separate")
            meta = {**meta, "reward_gain": meta.get("warm_gain", 1.0),
                    "reward_bias": meta.get("warm_bias", 0.0)}
        gain, bias = float(meta.get("reward_gain", 1.0)), float(meta.get("reward_bias", 0.0))

        def single(q, tokens, positions, attn_mask):
            return {"score": sequence_scores(rm, q, tokens, positions, attn_mask) * gain + bias}
        return RewardModelScorer(rm, params, meta, jax.jit(single, out_shardings=rows), None,
                                 None, gain, bias)
    gains, biases = meta.get("reward_gain"), meta.get("reward_bias")
    for name, v in (("reward_gain", gains), ("reward_bias", biases)):
        if not isinstance(v, list) or len(v) != k:
            raise ValueError(f"rm model.json: an ensemble of {k} members needs {name} as a list "
                             f"of {k} numbers (one per member), got {v!r}")
    trunk_kind = meta.get("ensemble_trunk") or "separate"
    scorer_model = scoring_model(rm, trunk_kind)
    gain_K = np.asarray(gains, np.float32)[:, None]
    bias_K = np.asarray(biases, np.float32)[:, None]

    def aggregated(q, tokens, positions, attn_mask):
        members_KxB = (ensemble_raw_scores(scorer_model, trunk_kind, q, tokens, positions,
                                           attn_mask)
                       * gain_K + bias_K)
        return {"score": aggregate(members_KxB, aggregation, coef),
                "std": member_std(members_KxB)}
    return RewardModelScorer(rm, params, meta, jax.jit(aggregated, out_shardings=rows), k,
                             aggregation, tuple(map(float, gains)), tuple(map(float, biases)))


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
    jitted function.

    A reward-model ensemble (``rm.ensemble``) is scored through ``reward_model_scorer`` with
    ``ppo.reward_aggregation``: ``"warm"`` turns it into one reward model (the members'
    weight average, Ramé et al. 2024) and everything runs as with a single one; any other
    aggregation runs the iteration staged, the aggregated normalised score being the reward
    model's (Coste et al. 2023), with ``reward/reward_model/member_std`` logged. A separate
    value model (``ppo.ppo.value_model = "separate"``) starts from the reward model actually
    used: the WARM average, or member 0 of an aggregated ensemble (one member: a value
    model is one scalar model, and any member is as good a start as another)."""
    c = run.cfg.ppo
    run.begin(get_stage("ppo"))
    frozen_layers = run.cfg.policy.frozen_layers
    if c.init == "sft":
        start_model, start_params, _ = run.load_final("sft", frozen_layers=frozen_layers)
        start_model, start_params = run.merged(start_model, start_params)
    else:
        start_model, start_params = run.initial_policy()
    reward = rl_reward(run)
    rm = rm_params = scorer = None
    rm_meta: dict = {}
    if reward.model_weight:
        rm, rm_params, rm_meta = run.load_final("rm")
        scorer = reward_model_scorer(run, rm, rm_params, rm_meta)
        rm_params, rm_meta = scorer.params, scorer.meta  # WARM: the averaged model
        if not rm_meta.get("ensemble") and c.reward_aggregation not in (None, "mean"):
            log.warning("ppo: reward_aggregation=%r has no effect: the reward model is not an "
                        "ensemble (rm.ensemble)", c.reward_aggregation)
    ensemble = scorer is not None and scorer.ensemble is not None
    critic = c.ppo.needs_critic
    separate = critic and c.ppo.value_model == "separate"
    policy = Model(start_model.cfg, kind="lm_value" if critic and not separate else "lm")
    params = run.with_head(start_params, policy, jax.random.key(run.cfg.seed + 3))
    policy, params = run.start_lora("ppo", policy, params, 103,
                                    base_from="sft" if c.init == "sft" else "initial")
    # With LoRA the reference is the policy's frozen base (adapters off): no copy.
    ref_params = (jax.tree.map(jnp.copy, params) if c.ppo.uses_reference and run.lora is None
                  else None)
    gain, bias = (scorer.gain, scorer.bias) if scorer is not None and not ensemble else (1.0, 0.0)
    staged = bool(reward.functions) or c.dynamic_sampling or ensemble
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
        value_init = ensemble_member_params(rm_params, rm_meta, 0) if ensemble else rm_params
        value_model, value_init = run.start_lora(None, value_model, value_init, 105,
                                                 base_from="rm")
        value_tx, value_state, value_shardings = run.train_state(
            value_model, value_init, c.value_optimizer, updates, 5)
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
                               ref_sharding, reward, scorer, data, bcfg)
    else:
        iteration = make_ppo_iteration(
            policy_model=policy, reward_model=rm, policy_tx=tx, cfg=ppo_cfg,
            value_model=value_model, value_tx=value_tx, state_sharding=state_shardings,
            prompt_sharding=run.batch_sharding(),
            frozen_shardings=(ref_sharding, rm.param_shardings(run.mesh)))

        def step(state, batch: PromptBatch, ref, reward_params):
            return iteration(state, batch.tokens, batch.attn_mask, ref, reward_params)

    if c.refresh_every:  # iterated RLHF: the loop's state also holds the reward model
        if scorer is None or ensemble:
            raise ValueError("ppo.refresh_every retrains the proxy reward model during RL: it "
                             "needs one reward model (ppo.reward_model_weight != 0, no "
                             "rm.ensemble aggregation)")
        rm_opt = dataclasses.replace(run.cfg.rm.optimizer, schedule="constant", warmup_steps=0)
        rm_tx, rm_state, rm_shardings = run.train_state(rm, rm_params, rm_opt, 1, 6)
        length = max(run.cfg.data.prompt_buckets) + c.ppo.sampling.max_new_tokens
        refresher = Refresher(run, policy, rm, rm_tx, rm_shardings, length)
        step, state = refresher.wrap(step), refresher.init_state(state, rm_state)
        rm_params = None  # read from the state at every iteration
    probe = None
    if c.probe_every:
        # LoRA: None, the KL is to the policy's own base (adapters off)
        probe_ref = (ref_params if ref_params is not None or run.lora is not None
                     else jax.tree.map(jnp.copy, params))
        probe = gold_proxy_probe(run, policy, probe_ref, scorer)
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
    the stage's normalisation and, for an ensemble, aggregation: what RL optimises; absent
    without a reward model), ``probe/kl`` (nats per
    sequence, ``log pi - log pi_ref`` summed over the response and averaged over samples,
    an unbiased estimate of KL(pi || pi_ref) of the sampled distributions) and
    ``probe/sqrt_kl``. Gao et al. 2023 plot gold and proxy against ``sqrt(KL)``.

    Args:
      ref_params: the starting policy's parameters (KL is measured to it); ``None``: the
        LoRA policy's own frozen base (its parameters with the adapters off).
      rm: the stage's ``RewardModelScorer`` (``reward_model_scorer``) or ``None``.
    """
    from rlhf_jax.pipeline.evaluate import _sample_policy

    c = run.cfg.ppo
    role = "eval_prompts" if run.task.has("eval_prompts") else "prompts"
    count = c.probe_prompts or 64
    batches, prefixes = prompt_batches(run, role, count, run.cfg.eval.batch_size)
    columns = run.prompt_dataset(role).columns
    sampling = run.sampling(c.ppo.sampling)
    sampler = make_sampler(policy, sampling)
    logp_fn = jax.jit(policy_forward,
                      static_argnames=("model", "prompt_len", "sampling", "adapters"))

    def probe(state, step):
        current = rm
        if rm is not None and refresh_params(state) is not None:  # the refreshed proxy
            current = dataclasses.replace(rm, params=refresh_params(state))
        rows, _ = _sample_policy(run, policy, state.policy.params, (policy, ref_params), current,
                                 batches, prefixes, columns, sampling, sampler, logp_fn,
                                 key_offset=7000, gold=True)
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
                    state_shardings, ref_sharding, reward: RewardSum,
                    scorer: RewardModelScorer | None, data, bcfg):
    """The staged RL step ``(state, batch, ref, reward_params) -> (state, metrics)``: sample
    ``k`` responses per prompt (device), score them with the reward model (device:
    ``scorer``, normalised and, for an ensemble, aggregated; ``reward_params`` its params),
    decode this process's rows and score them with the host reward sources, optionally
    refill the batch with informative groups (dynamic sampling), then learn (device). An
    ensemble also logs ``reward/reward_model/member_std``: the mean over rollouts of the
    between-member std of the normalised scores (reward units)."""
    c = run.cfg.ppo
    k = ppo_cfg.num_samples
    rows_sharding = run.batch_sharding()
    stages = PPOStages(policy_model=policy, policy_tx=tx, cfg=ppo_cfg, value_model=value_model,
                       value_tx=value_tx, state_sharding=state_shardings,
                       row_sharding=rows_sharding, ref_sharding=ref_sharding)
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
        model_scores = member_spread = None
        if scorer is not None:
            scored = scorer(tokens, positions, attn, reward_params)
            model_scores = local_rows(scored["score"])
            if "std" in scored:
                member_spread = local_rows(scored["std"]).astype(np.float64)
        total, metrics = reward(prompt_texts, responses, columns, model_scores)
        if member_spread is not None:
            metrics["reward/reward_model/member_std"] = (float(member_spread.sum()),
                                                         float(member_spread.size))
        rows = {"tokens": local_tokens, "attn_mask": local_attn, "response_mask": response_mask,
                "ended": local_rows(out.ended), "scores": total.astype(np.float32),
                "logprobs": local_rows(out.logprobs)}
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
                                            placed["ended"], placed["scores"], ref,
                                            placed["logprobs"])
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
    model, sft_params = run.start_lora("dpo", model, sft_params, 104, base_from="sft")
    # SimPO / ORPO use no reference, and with LoRA the reference is the policy's frozen base
    # (adapters off): no second copy of the model then.
    ref_params = (jax.tree.map(jnp.copy, sft_params)
                  if c.dpo.needs_reference and run.lora is None else None)
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
