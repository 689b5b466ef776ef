"""The RLHF pipeline: SFT -> reward model -> PPO, and DPO from the same SFT model, then a judged
evaluation and a report.

Each stage writes ``<out_dir>/<stage>/``: ``checkpoints/`` (full state, for ``--resume``),
``final/`` (the trained parameters + ``model.json``, what the next stage reads) and, for
policies, ``hf/`` (an HF checkpoint directory transformers can load). A stage whose
``final/`` exists is not run again, so a killed ``pipeline`` resumes where it stopped.

The built-in task (``DataConfig.kind = "sentiment"``) is the "positive review" task of
Ziegler et al. 2019 §4.1 with *human* judgements: SFT on review snippets (any sentiment), a
reward model on pairs of snippets whose mean human ratings differ (Hutto & Gilbert 2014),
PPO / DPO towards positive text, and the VADER analyser as an independent judge the reward
model never saw. RL prompts are the domain's instruction with the opening words of a
held-out snippet pre-filled at the start of the assistant turn, so that
``prompt + response`` has exactly the format the reward model was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.checkpoint import Checkpointer, config_to_dict, model_fingerprint
from rlhf_jax.config import ModelConfig
from rlhf_jax.control import KLController
from rlhf_jax.data.config import DataConfig as BatchConfig
from rlhf_jax.data.pipeline import PromptDataset, load_preferences, load_prompts, load_sft
from rlhf_jax.data.records import DataStats
from rlhf_jax.data.tokenize import ChatTokenizer
from rlhf_jax.losses.kl import sequence_kl
from rlhf_jax.losses.reward import normalization_gain_bias
from rlhf_jax.metrics import MetricsLogger, progress
from rlhf_jax.models.model import Model, Params, with_head
from rlhf_jax.rollout.postprocess import decode
from rlhf_jax.rollout.sampler import SamplingConfig, make_sampler
from rlhf_jax.train.common import sequence_scores
from rlhf_jax.train.dpo import DPOConfig, make_dpo_eval, make_dpo_step
from rlhf_jax.train.loop import LoopConfig, run_loop
from rlhf_jax.train.ppo import PPOConfig, init_ppo_state, make_ppo_iteration, policy_forward
from rlhf_jax.train.reward import RewardConfig, make_reward_eval, make_reward_step
from rlhf_jax.train.sft import SFTConfig, make_sft_step
from rlhf_jax.train.state import (OptimizerConfig, create_sharded_train_state, make_optimizer,
                                  train_state_shardings)
from rlhf_jax.types import PromptBatch

log = logging.getLogger(__name__)
STAGES = ("sft", "rm", "ppo", "dpo", "eval")


class StagePreempted(Exception):
    """A stage stopped on SIGTERM after saving a checkpoint; ``--resume`` continues it."""


# ---- configuration ---------------------------------------------------------------------
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
    """

    source: Literal["smollm2", "hf", "random"] = "smollm2"
    path: Path | None = None
    random_model: ModelConfig | None = None
    tokenizer_path: Path | None = None
    frozen_layers: int = 0
    reward_layers: int | None = None
    reward_frozen_layers: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the records come from.

    Attributes:
      kind: ``"sentiment"`` (built-in human ratings) or ``"files"`` (JSONL / Parquet paths
        below, or HF dataset names with ``hf:`` prefix, e.g. ``hf:trl-lib/tldr:train``).
      sft, preferences, prompts, eval_prompts, eval_preferences: sources for ``"files"``.
      domains: sentiment domains to use (``movie_reviews``, ``tweets``, ``editorials``,
        ``product_reviews``); ``None`` = all.
      margin: minimum difference of human mean ratings for a preference pair.
      min_words, max_words: snippet length filter (words).
      opening_words: words of a held-out snippet pre-filled as the start of an RL prompt.
      system_prompt: system message of every built-in prompt (``None``: the chat template's
        default; SmolLM2's default costs ~20 tokens per sequence).
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
    domains: tuple[str, ...] | None = ("movie_reviews",)
    margin: float = 1.0
    min_words: int = 6
    max_words: int = 24
    opening_words: int = 3
    system_prompt: str | None = "You write short reviews."
    buckets: tuple[int, ...] = (64, 96)
    prompt_buckets: tuple[int, ...] = (32, 48)
    skip_invalid: bool = True
    seed: int = 0


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
      eval_pairs: held-out human pairs for the reported accuracy.
      normalize_prompts: SFT samples used to set the reward's gain/bias (mean 0, std 1 on
        the SFT policy's samples, Ziegler et al. 2019 §2.2); 0 disables it.
    """

    steps: int = 100
    batch_size: int = 16
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=5, schedule="cosine",
                                                 total_steps=100)
    step: RewardConfig = RewardConfig()
    eval_pairs: int = 512
    normalize_prompts: int = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOStageConfig:
    """PPO stage: ``iterations`` rollouts of ``batch_size`` prompts each."""

    iterations: int = 40
    batch_size: int = 8
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5, max_grad_norm=1.0)
    ppo: PPOConfig = PPOConfig(sampling=SamplingConfig(max_new_tokens=24, eos_token_id=2,
                                                       pad_token_id=2),
                               num_ppo_epochs=2, kl=KLController(kind="fixed", init_kl_coef=0.05))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOStageConfig:
    """DPO stage: ``steps`` updates of ``batch_size`` pairs."""

    steps: int = 60
    batch_size: int = 8
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5, warmup_steps=5, total_steps=60)
    dpo: DPOConfig = DPOConfig(beta=0.1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Judged evaluation of SFT, PPO and DPO samples on held-out prompts.

    Attributes:
      num_prompts: held-out prompts (the same for every model).
      batch_size: prompts per sampling call.
      max_new_tokens: response budget.
      min_new_tokens: no EOS before this many response tokens (``SamplingConfig``); set it
        to the PPO rollout's value so the models are judged on the responses they were
        trained to write.
      temperature: sampling temperature (same key for every model); 0 = greedy.
      samples_in_report: completions shown per model in the report.
    """

    num_prompts: int = 64
    batch_size: int = 32
    max_new_tokens: int = 24
    min_new_tokens: int = 0
    temperature: float = 0.7
    samples_in_report: int = 6


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The whole pipeline; every field is overridable on the command line.

    Attributes:
      name: run name (report title).
      out_dir: where stages, metrics and the report go.
      cache_dir: fetched assets (default ``$RLHF_JAX_CACHE`` or ``~/.cache/rlhf_jax``).
      seed: parameter-init / sampling seed (the data order has ``data.seed``).
      stages: stages to run, in order (subset of ``sft, rm, ppo, dpo, eval``).
      resume: continue stages from their checkpoints and skip finished ones.
      checkpoint_every: steps between checkpoints within a stage (0 = end only).
      mesh: device mesh.
      tensorboard: also write TensorBoard events.
    """

    name: str = "rlhf"
    out_dir: Path = Path("runs/rlhf")
    cache_dir: Path | None = None
    seed: int = 0
    stages: tuple[str, ...] = STAGES
    resume: bool = True
    checkpoint_every: int = 50
    policy: PolicyConfig = PolicyConfig()
    data: DataConfig = DataConfig()
    sft: SFTStageConfig = SFTStageConfig()
    rm: RMStageConfig = RMStageConfig()
    ppo: PPOStageConfig = PPOStageConfig()
    dpo: DPOStageConfig = DPOStageConfig()
    eval: EvalConfig = EvalConfig()
    mesh: sharding.MeshConfig = sharding.MeshConfig()
    tensorboard: bool = True

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"PipelineConfig.stages has unknown {bad}; expected a subset of {STAGES}")


# ---- stage outputs ---------------------------------------------------------------------
def save_final(directory: Path, model: Model, params: Params, extra: dict | None = None) -> None:
    """Write a stage's trained parameters (orbax) and ``model.json`` (config, kind, extras)."""
    directory = Path(directory)
    if jax.process_count() > 1:  # arrays spread over hosts: gather every shard first
        from jax.experimental import multihost_utils
        host = multihost_utils.process_allgather(params, tiled=True)
    else:
        host = jax.device_get(params)
    with Checkpointer(directory / "params", max_to_keep=1) as ckpt:
        ckpt.save(0, host, {"fingerprint": model_fingerprint(model)}, force=True)
    (directory / "model.json").write_text(json.dumps(
        {"config": config_to_dict(model.cfg), "kind": model.kind, **(extra or {})}, indent=1))


def load_final(directory: Path, *, frozen_layers: int | None = None,
               shardings=None) -> tuple[Model, Params, dict]:
    """Read what ``save_final`` wrote: ``(model, params, extras)``.

    Raises:
      FileNotFoundError: the stage has not finished (names the directory).
    """
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: run the stage that writes {directory} first")
    meta = json.loads(meta_path.read_text())
    cfg = _model_config_from_dict(meta["config"])
    if frozen_layers is not None:
        cfg = dataclasses.replace(cfg, frozen_layers=frozen_layers)
    model = Model(cfg, kind=meta["kind"])
    abstract = model.abstract_params()
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
    with Checkpointer(directory / "params", max_to_keep=1) as ckpt:
        params, _ = ckpt.restore(abstract, expected_fingerprint=model_fingerprint(model))
    return model, params, meta


def _model_config_from_dict(d: dict) -> ModelConfig:
    from rlhf_jax.config import RopeScaling
    d = dict(d)
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return ModelConfig(**d)


# ---- the run ---------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """Everything the stages share (built once by ``Run.create``)."""

    cfg: PipelineConfig
    out: Path
    mesh: Any
    tokenizer: Any
    chat: ChatTokenizer
    logger: MetricsLogger
    records: dict  # the built-in data set's record lists, or {}

    @classmethod
    def create(cls, cfg: PipelineConfig) -> "Run":
        out = Path(cfg.out_dir)
        if not cfg.resume:
            earlier = [out / st for st in cfg.stages if (out / st).exists()]
            if earlier:
                raise FileExistsError(
                    f"{out} already holds outputs of an earlier run ({', '.join(map(str, earlier))}); "
                    "nothing saved is overwritten: pass --resume to continue it, or choose another "
                    "--out-dir")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1, default=str))
        mesh = sharding.make_mesh(cfg.mesh)
        tokenizer = _load_tokenizer(cfg)
        records = _sentiment_records(cfg) if cfg.data.kind == "sentiment" else {}
        logger = MetricsLogger(out, tensorboard=cfg.tensorboard, config=config_to_dict(cfg))
        return cls(cfg=cfg, out=out, mesh=mesh, tokenizer=tokenizer, chat=ChatTokenizer(tokenizer),
                   logger=logger, records=records)

    def batch_config(self, batch_size: int, *, seed_offset: int = 0, prompts: bool = False,
                     num_candidates: int | None = None) -> BatchConfig:
        d = self.cfg.data
        # Training streams wrap into the next epoch: no filler rows, which pairwise and DPO
        # losses (defined per pair, not per token) would otherwise count.
        del prompts
        return BatchConfig(batch_size=batch_size, buckets=d.buckets, prompt_buckets=d.prompt_buckets,
                           skip_invalid=d.skip_invalid, seed=d.seed + seed_offset,
                           remainder="wrap", num_candidates=num_candidates)

    def batches(self, dataset, bcfg: BatchConfig):
        """This process's slice of the training stream (all processes agree on the order)."""
        return dataset.batches(bcfg, process_index=jax.process_index(),
                               process_count=jax.process_count())

    def place(self, batch):
        return sharding.shard_batch(batch, self.mesh)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def done(self, stage: str) -> bool:
        return self.cfg.resume and (self.stage_dir(stage) / "final" / "model.json").exists()


def _load_tokenizer(cfg: PipelineConfig):
    from rlhf_jax.models.tokenizer import load_tokenizer
    p = cfg.policy
    path = p.tokenizer_path or (p.path if p.source == "hf" else None)
    if path is None:
        from rlhf_jax.models.convert.smollm2 import fetch_smollm2
        path = fetch_smollm2(cfg.cache_dir)
    return load_tokenizer(path)


def _messages(instruction: str, system_prompt: str | None) -> list[dict] | str:
    """The chat prompt of a built-in record: ``[system,] user``."""
    if system_prompt is None:
        return instruction
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": instruction}]


def _sentiment_records(cfg: PipelineConfig) -> dict:
    from rlhf_jax.data import sentiment as s
    d = cfg.data
    splits = s.split_sentiment_ratings(s.fetch_sentiment_ratings(cfg.cache_dir), seed=0)
    kw = dict(min_words=d.min_words, max_words=d.max_words, domains=d.domains)
    records = {
        "sft": s.sentiment_sft_records(splits["train"], **kw),
        "preferences": s.sentiment_preference_records(splits["train"], margin=d.margin, seed=d.seed, **kw),
        "eval_preferences": s.sentiment_preference_records(splits["test"], margin=d.margin,
                                                           seed=d.seed, **kw),
        "prompts": s.sentiment_prompt_records(splits["validation"], opening_words=d.opening_words,
                                              min_words=max(d.min_words, d.opening_words + 1),
                                              max_words=d.max_words, domains=d.domains),
        "eval_prompts": s.sentiment_prompt_records(splits["test"], opening_words=d.opening_words,
                                                   min_words=max(d.min_words, d.opening_words + 1),
                                                   max_words=d.max_words, domains=d.domains),
    }
    if d.system_prompt is not None:
        records["sft"] = [{"messages": _messages(r["prompt"], d.system_prompt)
                           + [{"role": "assistant", "content": r["completion"]}]}
                          for r in records["sft"]]
        for key in ("preferences", "eval_preferences"):
            records[key] = [{**r, "prompt": _messages(r["prompt"], d.system_prompt)}
                            for r in records[key]]
    return records


def _source(run: Run, key: str):
    """The records of ``key`` (built-in) or the configured file / HF data set."""
    if run.cfg.data.kind == "sentiment":
        return run.records[key]
    spec = getattr(run.cfg.data, key)
    if spec is None:
        raise ValueError(f"data.kind='files' needs data.{key} (a JSONL/Parquet path or hf:NAME:SPLIT)")
    if spec.startswith("hf:"):
        import datasets
        _, name, *split = spec.split(":")
        return datasets.load_dataset(name, split=split[0] if split else "train")
    return Path(spec)


def prompt_dataset(run: Run, key: str) -> PromptDataset:
    """RL prompts. Built-in: the instruction rendered as a generation prompt, then the held-out
    snippet's opening pre-filled as the beginning of the assistant turn (module docstring)."""
    bcfg = run.batch_config(1, prompts=True)
    if run.cfg.data.kind != "sentiment":
        return load_prompts(_source(run, key), run.tokenizer, bcfg, name=key)
    from rlhf_jax.data.sentiment import INSTRUCTIONS
    examples, locations, openings = [], [], []
    stats = DataStats(source=f"sentiment/{key}")
    max_len = bcfg.max_prompt_length
    for i, rec in enumerate(run.records[key]):
        ids = run.chat.prompt_ids(_messages(INSTRUCTIONS[rec["domain"]], run.cfg.data.system_prompt)) \
            + run.chat.encode_text(rec["opening"])
        stats.seen += 1
        if len(ids) > max_len:
            stats.skipped["too_long"] += 1
            continue
        stats.kept += 1
        examples.append(np.asarray(ids, np.int32))
        locations.append(f"{key}[{i}]")
        openings.append(rec["opening"])
    data = PromptDataset(examples, locations, stats, bcfg.prompt_buckets, run.tokenizer.pad_token_id)
    data.openings = openings  # the pre-filled text of each prompt, for the judge and the report
    return data


def _initial_policy(run: Run) -> tuple[Model, Params]:
    p = run.cfg.policy
    if p.source == "random":
        if p.random_model is None:
            raise ValueError("policy.source='random' needs policy.random_model")
        model = Model(dataclasses.replace(p.random_model, frozen_layers=p.frozen_layers, dtype=p.dtype))
        return model, model.init_sharded(jax.random.key(run.cfg.seed), run.mesh)
    from rlhf_jax.models.convert.hf import load_hf_checkpoint
    if p.source == "smollm2":
        from rlhf_jax.models.convert.smollm2 import fetch_smollm2
        path = fetch_smollm2(run.cfg.cache_dir)
    else:
        path = p.path
    model, params = load_hf_checkpoint(path)
    model = Model(dataclasses.replace(model.cfg, frozen_layers=p.frozen_layers, dtype=p.dtype))
    return model, jax.device_put(params, model.param_shardings(run.mesh))


def _train_state(run: Run, model: Model, params: Params, opt: OptimizerConfig, total_steps: int,
                 seed_offset: int):
    opt = dataclasses.replace(opt, total_steps=max(total_steps, opt.warmup_steps, 1))
    tx = make_optimizer(opt, params, frozen_layers=model.cfg.frozen_layers)
    shardings = model.param_shardings(run.mesh)
    params = jax.device_put(params, shardings)
    state = create_sharded_train_state(params, tx, jax.random.key(run.cfg.seed + seed_offset),
                                       run.mesh, shardings)
    return tx, state, train_state_shardings(shardings, tx, jax.eval_shape(lambda: params), run.mesh)


def _loop(run: Run, stage: str, step_fn, state, batches, steps: int, model: Model, *,
          frozen=(), loss_key=None, eval_fn=None):
    loop_cfg = LoopConfig(total_steps=steps, checkpoint_every=run.cfg.checkpoint_every,
                          resume=run.cfg.resume)
    with jax.set_mesh(run.mesh):
        result = run_loop(stage=stage, step_fn=step_fn, state=state, batches=batches,
                          place=run.place, out_dir=run.stage_dir(stage), cfg=loop_cfg,
                          logger=run.logger, frozen=frozen, loss_key=loss_key,
                          fingerprint=model_fingerprint(model), eval_fn=eval_fn,
                          meta={"config": config_to_dict(run.cfg)})
    if result.preempted:  # never write final/: the stage is unfinished
        raise StagePreempted(f"{stage}: stopped by SIGTERM at step {result.step} "
                             f"(checkpoint saved in {run.stage_dir(stage) / 'checkpoints'})")
    return result


# ---- stages ----------------------------------------------------------------------------
def run_sft(run: Run) -> None:
    """Stage 1: supervised fine-tuning of the initial policy on demonstrations."""
    c = run.cfg.sft
    model, params = _initial_policy(run)
    data = load_sft(_source(run, "sft"), run.tokenizer, run.batch_config(c.batch_size), name="sft")
    log.info("sft: %s", data.stats.summary())
    tx, state, shardings = _train_state(run, model, params, c.optimizer, c.steps, 1)
    step = make_sft_step(model, tx, c.step)
    result = _loop(run, "sft", step, state, run.batches(data, run.batch_config(c.batch_size)), c.steps,
                   model, loss_key="sft/loss")
    _finish_policy(run, "sft", model, result.state.params)


def _finish_policy(run: Run, stage: str, model: Model, params: Params, extra=None) -> None:
    from rlhf_jax.models.convert.hf import save_hf_checkpoint
    final = run.stage_dir(stage) / "final"
    lm = Model(model.cfg, kind="lm")
    lm_params = {k: v for k, v in params.items() if k in ("trunk", "lm_head")}
    save_final(final, lm, lm_params, extra)
    save_hf_checkpoint(lm, lm_params, run.stage_dir(stage) / "hf", tokenizer=run.tokenizer)


def _on_mesh(run: Run, model: Model, params: Params) -> Params:
    """``params`` placed with ``model``'s shardings on the run's mesh: frozen copies (reference,
    reward) and the trained state must live on the same devices for the jitted steps."""
    return jax.device_put(params, model.param_shardings(run.mesh))


def _truncate_trunk(params: Params, n_layers: int) -> Params:
    trunk = dict(params["trunk"])
    trunk["blocks"] = jax.tree.map(lambda x: x[:n_layers], trunk["blocks"])
    return {**params, "trunk": trunk}


def _preference_data(run: Run, batch_size: int, seed_offset: int, num_candidates: int | None):
    """``(batch config, training comparisons, held-out comparisons)``."""
    bcfg = run.batch_config(batch_size, seed_offset=seed_offset, num_candidates=num_candidates)
    data = load_preferences(_source(run, "preferences"), run.tokenizer, bcfg, name="preferences")
    eval_data = load_preferences(_source(run, "eval_preferences"), run.tokenizer, bcfg,
                                 name="eval_preferences")
    return bcfg, data, eval_data


def run_rm(run: Run) -> None:
    """Stage 2: reward model on the SFT trunk (optionally truncated), trained on comparisons,
    evaluated on held-out comparisons, normalised on SFT samples."""
    c, p = run.cfg.rm, run.cfg.policy
    sft_model, sft_params, _ = load_final(run.stage_dir("sft") / "final")
    sft_params = _on_mesh(run, sft_model, sft_params)  # sampled with the (sharded) RM below
    n_layers = p.reward_layers or sft_model.cfg.n_layers
    rm_cfg = dataclasses.replace(sft_model.cfg, n_layers=n_layers, frozen_layers=p.reward_frozen_layers)
    rm = Model(rm_cfg, kind="scalar")
    params = with_head(_truncate_trunk(sft_params, n_layers), rm, jax.random.key(run.cfg.seed + 2))
    bcfg, data, eval_data = _preference_data(run, c.batch_size, 2,
                                             2 if c.step.loss == "pairwise" else None)
    tx, state, _ = _train_state(run, rm, params, c.optimizer, c.steps, 2)
    evaluate = make_reward_eval(rm, c.step)

    def eval_fn(state, step):
        return _eval_pairs(run, lambda b: evaluate(state.params, b), eval_data, c.eval_pairs,
                           c.batch_size, "rm_eval")

    result = _loop(run, "rm", make_reward_step(rm, tx, c.step), state, run.batches(data, bcfg), c.steps,
                   rm, loss_key="rm/loss", eval_fn=eval_fn)
    gain, bias = 1.0, 0.0
    if c.normalize_prompts:
        scores = _sft_sample_scores(run, sft_model, sft_params, rm, result.state.params,
                                    c.normalize_prompts)
        gain, bias = (float(x) for x in normalization_gain_bias(jnp.asarray(scores)))
    final_eval = result.records[-1] if result.records else {}
    save_final(run.stage_dir("rm") / "final", rm, result.state.params,
               {"reward_gain": gain, "reward_bias": bias,
                "heldout_accuracy": final_eval.get("rm/accuracy")})


def _eval_pairs(run: Run, metrics_fn, dataset, max_pairs: int, batch_size: int, prefix: str):
    """Metrics over up to ``max_pairs`` held-out pairs (one pass, in order)."""
    bcfg = dataclasses.replace(run.batch_config(batch_size), shuffle=False, num_epochs=1,
                               remainder="drop")
    totals: dict[str, list[float]] = {}
    seen = 0
    for batch in dataset.batches(bcfg):
        if seen >= max_pairs:
            break
        m = jax.device_get(metrics_fn(run.place(batch)))
        for k, (s, cnt) in m.items():
            acc = totals.setdefault(k, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(cnt)
        seen += batch_size
    return {k: s / max(cnt, 1.0) for k, (s, cnt) in totals.items()}


def _sample_prompts(run: Run, key: str, count: int, batch_size: int):
    """``(batches, openings)``: the first ``count`` prompts of ``key`` in order (wrapping if the
    set is smaller), in ``batch_size`` batches, and each row's pre-filled opening text."""
    data = prompt_dataset(run, key)
    bcfg = dataclasses.replace(run.batch_config(batch_size, prompts=True), shuffle=False)
    it = data.batches(bcfg)
    batches = [next(it) for _ in range(max(1, math.ceil(count / batch_size)))]
    openings = getattr(data, "openings", [""] * len(data))
    return batches, [openings[i % len(data)] for i in range(len(batches) * batch_size)]


def _sft_sample_scores(run: Run, sft_model, sft_params, rm, rm_params, count: int) -> np.ndarray:
    sampling = dataclasses.replace(run.cfg.ppo.ppo.sampling, eos_token_id=run.tokenizer.eos_token_id,
                                   pad_token_id=run.tokenizer.pad_token_id)
    sampler = make_sampler(sft_model, sampling)
    score = jax.jit(lambda p, t, pos, m: sequence_scores(rm, p, t, pos, m))
    out = []
    for i, batch in enumerate(_sample_prompts(run, "prompts", count, min(count, 32))[0]):
        s = sampler(sft_params, batch.tokens, batch.attn_mask, jax.random.key(run.cfg.seed + 100 + i))
        out.append(np.asarray(score(rm_params, s.tokens, s.positions, s.attn_mask)))
    return np.concatenate(out)


def _share_frozen(cfg, model: Model):
    """``cfg`` (a ``PPOConfig`` or ``DPOConfig``) with ``reference_shares_frozen_layers`` on
    whenever the policy has frozen layers: the stages' reference is a copy of the policy's
    initial parameters, and the optimizer never moves the frozen part, so the two agree there
    by construction."""
    return dataclasses.replace(cfg, reference_shares_frozen_layers=model.cfg.frozen_layers > 0)


def run_ppo(run: Run) -> None:
    """Stage 3: PPO from the SFT policy against the reward model, KL to the frozen SFT policy."""
    c = run.cfg.ppo
    sft_model, sft_params, _ = load_final(run.stage_dir("sft") / "final")
    rm, rm_params, rm_meta = load_final(run.stage_dir("rm") / "final")
    policy = Model(dataclasses.replace(sft_model.cfg, frozen_layers=run.cfg.policy.frozen_layers),
                   kind="lm_value")
    params = with_head(sft_params, policy, jax.random.key(run.cfg.seed + 3))
    ref_params = _on_mesh(run, policy, jax.tree.map(jnp.copy, params))
    rm_params = _on_mesh(run, rm, rm_params)
    ppo_cfg = dataclasses.replace(
        _share_frozen(c.ppo, policy),
        reward_gain=rm_meta.get("reward_gain", 1.0), reward_bias=rm_meta.get("reward_bias", 0.0),
        sampling=dataclasses.replace(c.ppo.sampling, eos_token_id=run.tokenizer.eos_token_id,
                                     pad_token_id=run.tokenizer.pad_token_id))
    tx, policy_state, _ = _train_state(run, policy, params, c.optimizer, c.iterations, 3)
    state = init_ppo_state(policy_state, ppo_cfg.kl, jax.random.key(run.cfg.seed + 30))
    # Commit the controller scalars and the key replicated on the mesh, as the jitted
    # iteration returns them; uncommitted inputs would make iteration 2 compile again.
    state = state.replace(kl=jax.device_put(state.kl, sharding.replicated(run.mesh)),
                          rng=jax.device_put(state.rng, sharding.replicated(run.mesh)))
    iteration = make_ppo_iteration(policy_model=policy, reward_model=rm, policy_tx=tx, cfg=ppo_cfg)

    def step(state, batch: PromptBatch, ref, reward):
        return iteration(state, batch.tokens, batch.attn_mask, ref, reward)

    prompts = run.batches(prompt_dataset(run, "prompts"), run.batch_config(c.batch_size, prompts=True,
                                                                      seed_offset=3))
    result = _loop(run, "ppo", step, state, prompts, c.iterations, policy,
                   frozen=(ref_params, rm_params), loss_key="ppo/loss/total")
    _finish_policy(run, "ppo", policy, result.state.policy.params)


def run_dpo(run: Run) -> None:
    """Stage 4: DPO from the SFT policy on the same human comparisons, SFT as reference."""
    c = run.cfg.dpo
    sft_model, sft_params, _ = load_final(run.stage_dir("sft") / "final")
    model = Model(dataclasses.replace(sft_model.cfg, frozen_layers=run.cfg.policy.frozen_layers))
    ref_params = _on_mesh(run, model, jax.tree.map(jnp.copy, sft_params))
    bcfg, data, eval_data = _preference_data(run, c.batch_size, 4, 2)
    tx, state, _ = _train_state(run, model, sft_params, c.optimizer, c.steps, 4)
    dpo_cfg = _share_frozen(c.dpo, model)
    evaluate = make_dpo_eval(model, dpo_cfg)

    def eval_fn(state, step):
        return _eval_pairs(run, lambda b: evaluate(state.params, ref_params, b), eval_data,
                           run.cfg.rm.eval_pairs, c.batch_size, "dpo_eval")

    result = _loop(run, "dpo", make_dpo_step(model, tx, dpo_cfg), state, run.batches(data, bcfg), c.steps,
                   model, frozen=(ref_params,), loss_key="dpo/loss", eval_fn=eval_fn)
    _finish_policy(run, "dpo", model, result.state.params)


# ---- evaluation --------------------------------------------------------------------------
def _judge(texts: list[str]) -> np.ndarray:
    """VADER compound score in [-1, 1] per text (Hutto & Gilbert 2014): the independent judge."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    return np.asarray([analyzer.polarity_scores(t)["compound"] for t in texts], np.float64)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def run_eval(run: Run) -> dict:
    """Sample every trained policy on the same held-out prompts with the same key; judge with
    VADER and the reward model; report KL to the SFT reference; write the report."""
    from rlhf_jax.report import write_report
    e = run.cfg.eval
    policies = {name: load_final(run.stage_dir(name) / "final")
                for name in ("sft", "ppo", "dpo") if (run.stage_dir(name) / "final").exists()}
    if "sft" not in policies:
        raise FileNotFoundError(f"{run.stage_dir('sft') / 'final'} not found: run the sft stage first")
    rm = load_final(run.stage_dir("rm") / "final") if (run.stage_dir("rm") / "final").exists() else None
    batches, openings = _sample_prompts(run, "eval_prompts", e.num_prompts, e.batch_size)
    ref_model, ref_params, _ = policies["sft"]
    sampling = SamplingConfig(max_new_tokens=e.max_new_tokens, min_new_tokens=e.min_new_tokens,
                              greedy=e.temperature == 0, temperature=e.temperature or 1.0,
                              eos_token_id=run.tokenizer.eos_token_id,
                              pad_token_id=run.tokenizer.pad_token_id)
    # Response log-probs under the distribution sampled from (temperature, EOS constraint), so
    # the mean of log pi - log ref over samples estimates KL(pi_tau || ref_tau).
    logp_fn = jax.jit(policy_forward, static_argnames=("model", "prompt_len", "sampling"))
    results, samples, samplers = {}, {}, {}
    for name, (model, params, _) in progress(list(policies.items()), desc="eval", unit="model"):
        # One jitted sampler (one compile) per architecture: the policies usually share it.
        arch = (model.cfg, model.kind)
        sampler = samplers.get(arch) or samplers.setdefault(arch, make_sampler(model, sampling))
        texts, kl, rm_scores, lengths, ended = [], [], [], [], []
        for i, batch in enumerate(batches):
            s = sampler(params, batch.tokens, batch.attn_mask, jax.random.key(run.cfg.seed + 1000 + i))
            texts += decode(run.tokenizer, s.response, s.response_mask)
            p_len = batch.tokens.shape[1]
            lp = logp_fn(model, params, s.tokens, s.positions, s.attn_mask, prompt_len=p_len,
                         sampling=sampling)[0]
            lr = logp_fn(ref_model, ref_params, s.tokens, s.positions, s.attn_mask,
                         prompt_len=p_len, sampling=sampling)[0]
            kl.append(np.asarray(sequence_kl(lp, lr, s.response_mask)))
            lengths.append(np.asarray(s.lengths))
            ended.append(np.asarray(s.ended))
            if rm is not None:
                rm_model, rm_params, rm_meta = rm
                sc = sequence_scores(rm_model, rm_params, s.tokens, s.positions, s.attn_mask)
                rm_scores.append(np.asarray(sc) * rm_meta.get("reward_gain", 1.0)
                                 + rm_meta.get("reward_bias", 0.0))
        full = [o + t for o, t in zip(openings, texts)][: e.num_prompts]
        judge = _judge(full)
        results[name] = {"judge": judge, "kl": np.concatenate(kl)[: e.num_prompts],
                         "rm": np.concatenate(rm_scores)[: e.num_prompts] if rm_scores else None,
                         "length": np.concatenate(lengths)[: e.num_prompts],
                         "ended": np.concatenate(ended)[: e.num_prompts]}
        samples[name] = full[: e.samples_in_report]
    rows = []
    base = results["sft"]["judge"]
    for name, r in results.items():
        m, se = _mean_se(r["judge"])
        d, dse = _mean_se(r["judge"] - base)
        row = {"model": name.upper(), "VADER judge (mean ± s.e.)": f"{m:+.3f} ± {se:.3f}",
               "Δ vs SFT (paired)": "-" if name == "sft" else f"{d:+.3f} ± {dse:.3f} (t={d / max(dse, 1e-12):.1f})",
               "KL to SFT (nats/seq)": f"{np.mean(r['kl']):.2f}",
               "RM score": "-" if r["rm"] is None else f"{np.mean(r['rm']):+.2f}",
               "length (tokens)": f"{np.mean(r['length']):.1f}",
               "no-EOS share": f"{1 - np.mean(r['ended']):.2f}"}
        rows.append(row)
        run.logger.log(0, {"eval/judge": m, "eval/judge_se": se, "eval/judge_delta_vs_sft": d,
                           "eval/judge_delta_se": dse, "eval/kl": float(np.mean(r["kl"])),
                           **({"eval/rm_score": float(np.mean(r["rm"]))} if r["rm"] is not None else {})},
                       stage=f"eval_{name}")
    rm_acc = None
    if rm is not None:
        rm_acc = rm[2].get("heldout_accuracy")
    summary = {name: {"judge_mean": float(np.mean(r["judge"])),
                      "judge_delta_vs_sft": float(np.mean(r["judge"] - base)),
                      "judge_delta_se": _mean_se(r["judge"] - base)[1],
                      "kl": float(np.mean(r["kl"]))} for name, r in results.items()}
    summary["rm_heldout_accuracy"] = rm_acc
    (run.out / "summary.json").write_text(json.dumps(summary, indent=1))
    records = _read_stage_records(run)
    notes = (f"Held-out prompts: {len(base)} (same prompts and sampling key for every model, "
             f"temperature {e.temperature}). Judge: VADER compound score of the review text "
             f"(opening + completion), an analyser the reward model never saw. Δ is the paired "
             f"difference to SFT over prompts with its standard error. Reward-model accuracy on "
             f"held-out human pairs: {rm_acc if rm_acc is None else f'{rm_acc:.3f}'}.")
    report = write_report(run.out, title=f"rlhf_jax report: {run.cfg.name}", stages=records,
                          summary_rows=rows,
                          samples={n.upper(): list(zip(openings, s)) for n, s in samples.items()},
                          notes=notes)
    print(f"\n{_table(rows)}\n\nreport: {report}")
    return summary


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _read_stage_records(run: Run) -> dict[str, list[dict]]:
    from rlhf_jax.metrics import read_jsonl
    path = run.out / "metrics.jsonl"
    out: dict[str, list[dict]] = {}
    if path.exists():
        for r in read_jsonl(path):
            out.setdefault(str(r.get("stage", "")).replace("_eval", ""), []).append(r)
    return out


RUNNERS = {"sft": run_sft, "rm": run_rm, "ppo": run_ppo, "dpo": run_dpo, "eval": run_eval}


def run_pipeline(cfg: PipelineConfig) -> dict | None:
    """Run ``cfg.stages`` in order; finished stages are skipped when ``cfg.resume``."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("rlhf_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    run = Run.create(cfg)
    result = None
    try:
        for stage in cfg.stages:
            if stage != "eval" and run.done(stage):
                log.info("%s: already finished in %s, skipping", stage, run.stage_dir(stage))
                continue
            t = time.perf_counter()
            try:
                result = RUNNERS[stage](run)
            except StagePreempted as e:
                log.warning("%s; rerun the same command with --resume to continue", e)
                return None
            log.info("%s: %.0f s", stage, time.perf_counter() - t)
    finally:
        run.logger.close()
    log.info("pipeline: %.0f s in all", time.perf_counter() - t0)
    return result
