"""Named pipeline presets (``rlhf-jax pipeline --preset NAME``); every field stays overridable.

* ``smollm2-sentiment`` - the main job: SmolLM2-135M-Instruct (fetched through the package
  index) on the built-in human sentiment ratings; sized to finish within 30 minutes (22 measured) on a
  2-core CPU by training only the top blocks and giving the reward model a truncated trunk.
* ``smollm2-arithmetic`` - RL with a verifiable reward: GRPO from SmolLM2-135M-Instruct on
  procedurally generated addition problems (the ``arithmetic`` task), reward 1 for the exact
  answer; no SFT, no reward model; judged by greedy accuracy and mean@4 on 512 held-out
  problems. Sized for 30 minutes on a 2-core CPU.
* ``tiny`` - a random tiny Llama with SmolLM2's tokenizer on the same data: the whole pipeline
  in minutes (CI).
* ``gpt2-sentiment`` - GPT-2 with the PPO settings of Ziegler et al. 2019 (lm-human-preferences,
  sentiment task), for users with a network who downloaded ``gpt2`` to ``--policy.path``.
* ``tldr`` - TL;DR summarisation (Stiennon et al. 2020) on HF data sets, for users with a network.
* ``tldr-pythia`` - the same TL;DR task and data with Pythia-1B-deduped and the SFT / RM / PPO /
  DPO settings of Huang et al. 2024 (the N+ implementation details of RLHF with PPO), for users
  with a network and accelerators who downloaded the checkpoint to ``--policy.path``.
* ``gemma3-sentiment`` - the main job's sentiment task with Gemma 3 1B-it (``gemma3_text``)
  downloaded to ``--policy.path``, every block trained, sized for one accelerator or a TPU VM.

See ``experiments/`` for what each reproduces and the results to expect.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rlhf_jax.config import ModelConfig
from rlhf_jax.control import KLController
from rlhf_jax.pipeline.config import (DataConfig, DPOStageConfig, EvalConfig, PipelineConfig,
                                      PolicyConfig, PPOStageConfig, RMStageConfig, SFTStageConfig)
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.tasks.arithmetic.config import ArithmeticConfig
from rlhf_jax.train.dpo import DPOConfig
from rlhf_jax.train.ppo import PPOConfig
from rlhf_jax.train.reward import RewardConfig
from rlhf_jax.train.state import OptimizerConfig


def _sampling(max_new_tokens: int, temperature: float = 1.0, min_new_tokens: int = 0
              ) -> SamplingConfig:
    # EOS / pad ids unset: the pipeline takes the tokenizer's (set them to override).
    return SamplingConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                          temperature=temperature)


def smollm2_sentiment() -> PipelineConfig:
    """The main job (README's ``make demo``)."""
    return PipelineConfig(
        name="smollm2-sentiment",
        out_dir=Path("runs/smollm2-sentiment"),
        policy=PolicyConfig(source="smollm2", frozen_layers=26, reward_layers=12,
                            reward_frozen_layers=8),
        data=DataConfig(domains=("movie_reviews",), margin=1.5, min_words=6, max_words=20,
                        opening_words=3, buckets=(64,), prompt_buckets=(32,)),
        sft=SFTStageConfig(steps=30, batch_size=8,
                           optimizer=OptimizerConfig(lr=1e-4, warmup_steps=3, schedule="cosine",
                                                     total_steps=30)),
        rm=RMStageConfig(steps=60, batch_size=16, step=RewardConfig(loss="pairwise"),
                         optimizer=OptimizerConfig(lr=2e-4, warmup_steps=5, schedule="cosine",
                                                   total_steps=60),
                         eval_pairs=256, normalize_prompts=32),
        # Responses of 10-20 tokens: without the floor, PPO games the reward model by ending
        # early (measured: length 14 -> 7 tokens, RM score up, VADER down).
        ppo=PPOStageConfig(iterations=20, batch_size=16,
                           optimizer=OptimizerConfig(lr=5e-5, max_grad_norm=1.0),
                           ppo=PPOConfig(sampling=_sampling(20, temperature=0.7, min_new_tokens=10),
                                         num_ppo_epochs=4, num_minibatches=2, vf_coef=0.1,
                                         kl=KLController(kind="fixed", init_kl_coef=0.05))),
        dpo=DPOStageConfig(steps=40, batch_size=8, dpo=DPOConfig(beta=0.1), eval_pairs=256,
                           optimizer=OptimizerConfig(lr=2e-4, warmup_steps=3, total_steps=40)),
        eval=EvalConfig(num_prompts=128, batch_size=32, max_new_tokens=20, min_new_tokens=10,
                        temperature=0.7),
        checkpoint_every=20,
    )


def smollm2_arithmetic(advantage: str = "grpo") -> PipelineConfig:
    """GRPO (``advantage="grpo"``; ``rloo`` for the comparison run) from SmolLM2-135M-Instruct
    on the arithmetic task: 8 samples per prompt, reward = the ``correct`` verifier, k3 KL in
    the loss (Shao et al. 2024), the top 8 of 30 blocks trained. See
    experiments/smollm2_arithmetic.md."""
    group = dict(advantage=advantage, num_samples=8, num_ppo_epochs=1, num_minibatches=1,
                 loss_aggregation="sequence_mean")
    if advantage == "grpo":
        group.update(kl_penalty="loss", kl_estimator="k3")
    return PipelineConfig(
        name=f"smollm2-arithmetic-{advantage}",
        out_dir=Path(f"runs/smollm2-arithmetic-{advantage}"),
        task="arithmetic",
        # a + b with two-digit a, b, the response pre-filled with "a + b =": the initial model
        # is right about 1 time in 3 greedily (bench/README.md); 512 held-out problems
        arithmetic=ArithmeticConfig(sft_size=0),
        stages=("ppo", "eval"),
        policy=PolicyConfig(source="smollm2", frozen_layers=22),
        data=DataConfig(prompt_buckets=(48,)),
        ppo=PPOStageConfig(iterations=40, batch_size=8, init="initial", reward_model_weight=0.0,
                           optimizer=OptimizerConfig(lr=2e-5, max_grad_norm=1.0),
                           ppo=PPOConfig(sampling=_sampling(8, temperature=1.0),
                                         kl=KLController(kind="fixed", init_kl_coef=0.02),
                                         **group)),
        eval=EvalConfig(num_prompts=512, batch_size=64, max_new_tokens=8, temperature=0.0,
                        num_samples=4, sample_temperature=1.0, samples_in_report=8),
        checkpoint_every=10,
    )


def tiny() -> PipelineConfig:
    """Random tiny Llama, same data and code path (lower block frozen, as in the main job), a
    few steps per stage; batches of 8 divide every mesh of 8 devices (``--mesh.fsdp 8``), and
    every large tensor divides by 8."""
    model = ModelConfig(vocab_size=49152, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        mlp_dim=128, max_positions=256, tie_embeddings=True)
    return PipelineConfig(
        name="tiny",
        out_dir=Path("runs/tiny"),
        policy=PolicyConfig(source="random", random_model=model, reward_layers=1,
                            frozen_layers=1),
        data=DataConfig(domains=("movie_reviews",), min_words=6, max_words=16, buckets=(64,),
                        prompt_buckets=(32,)),
        sft=SFTStageConfig(steps=4, batch_size=8,
                           optimizer=OptimizerConfig(lr=1e-3, total_steps=4)),
        rm=RMStageConfig(steps=4, batch_size=8, eval_pairs=16, normalize_prompts=8,
                         optimizer=OptimizerConfig(lr=1e-3, total_steps=4)),
        ppo=PPOStageConfig(iterations=2, batch_size=8,
                           # 2 samples per prompt: every advantage estimator (group ones too)
                           # runs with one flag, --ppo.ppo.advantage NAME
                           ppo=PPOConfig(sampling=_sampling(8, min_new_tokens=3), num_ppo_epochs=1,
                                         num_samples=2,
                                         kl=KLController(kind="adaptive", init_kl_coef=0.1,
                                                         target=6.0, horizon=1000))),
        dpo=DPOStageConfig(steps=3, batch_size=8, eval_pairs=16,
                           optimizer=OptimizerConfig(lr=1e-3, total_steps=3)),
        eval=EvalConfig(num_prompts=8, batch_size=8, max_new_tokens=8, min_new_tokens=3,
                        num_samples=2, samples_in_report=2),
        checkpoint_every=2,
        tensorboard=False,
    )


def gpt2_sentiment() -> PipelineConfig:
    """GPT-2 (124M) on the sentiment task with the PPO settings of Ziegler et al. 2019
    (lm-human-preferences: response length 24, temperature 0.7, adaptive KL with target 6 nats
    and horizon 10000, gamma 1, lambda 0.95, clip 0.2, vf_coef 0.1, 4 PPO epochs) at a smaller
    batch; lr 1.41e-5 is TRL's GPT-2 sentiment example (lm-human-preferences uses 1e-5 decayed
    linearly, batch 512). GPT-2 has no chat template, so records are plain text
    (``system_prompt=None``). See experiments/gpt2_sentiment.md."""
    return PipelineConfig(
        name="gpt2-sentiment",
        out_dir=Path("runs/gpt2-sentiment"),
        policy=PolicyConfig(source="hf", path=Path("checkpoints/gpt2")),
        data=DataConfig(domains=("movie_reviews",), margin=1.0, buckets=(64, 96),
                        prompt_buckets=(32, 64), system_prompt=None),
        sft=SFTStageConfig(steps=1000, batch_size=32,
                           optimizer=OptimizerConfig(lr=5e-5, warmup_steps=50, schedule="cosine",
                                                     total_steps=1000)),
        rm=RMStageConfig(steps=1000, batch_size=32,
                         optimizer=OptimizerConfig(lr=5e-5, warmup_steps=50, schedule="cosine",
                                                   total_steps=1000), eval_pairs=2048),
        ppo=PPOStageConfig(iterations=500, batch_size=64,
                           optimizer=OptimizerConfig(lr=1.41e-5),
                           ppo=PPOConfig(sampling=_sampling(24, temperature=0.7), num_ppo_epochs=4,
                                         num_minibatches=4, vf_coef=0.1,
                                         kl=KLController(kind="adaptive", init_kl_coef=0.15,
                                                         target=6.0, horizon=10000))),
        dpo=DPOStageConfig(steps=1000, batch_size=32, dpo=DPOConfig(beta=0.1), eval_pairs=2048,
                           optimizer=OptimizerConfig(lr=5e-7, warmup_steps=50, total_steps=1000)),
        eval=EvalConfig(num_prompts=512, batch_size=64, max_new_tokens=24),
    )


def _tldr_data() -> DataConfig:
    """The TL;DR data of the ``tldr*`` presets: TRL's copies of the filtered Reddit TL;DR posts
    (SFT and RL prompts) and of OpenAI's summary comparisons (RM and DPO), with their
    validation splits; prompts up to 512 tokens, prompt + summary up to 640 (longer records
    are skipped and counted). See experiments/tldr.md, "Data"."""
    return DataConfig(kind="files", sft="hf:trl-lib/tldr:train",
                      preferences="hf:trl-lib/tldr-preference:train",
                      eval_preferences="hf:trl-lib/tldr-preference:validation",
                      prompts="hf:trl-lib/tldr:train", eval_prompts="hf:trl-lib/tldr:validation",
                      buckets=(512, 640), prompt_buckets=(512,))


def tldr() -> PipelineConfig:
    """TL;DR summarisation (Stiennon et al. 2020) from HF data sets (needs a network)."""
    return PipelineConfig(
        name="tldr",
        out_dir=Path("runs/tldr"),
        policy=PolicyConfig(source="hf", path=Path("checkpoints/Qwen2-0.5B")),
        data=_tldr_data(),
        sft=SFTStageConfig(steps=2000, batch_size=64,
                           optimizer=OptimizerConfig(lr=1e-5, warmup_steps=100, schedule="cosine",
                                                     total_steps=2000)),
        rm=RMStageConfig(steps=2000, batch_size=64, normalize_prompts=512,
                         optimizer=OptimizerConfig(lr=3e-6, warmup_steps=100, schedule="cosine",
                                                   total_steps=2000)),
        ppo=PPOStageConfig(iterations=1000, batch_size=64,
                           optimizer=OptimizerConfig(lr=3e-6),
                           ppo=PPOConfig(sampling=_sampling(53, temperature=0.7), num_ppo_epochs=4,
                                         num_minibatches=2, missing_eos_penalty=1.0,
                                         kl=KLController(kind="fixed", init_kl_coef=0.05))),
        dpo=DPOStageConfig(steps=2000, batch_size=64, dpo=DPOConfig(beta=0.1),
                           optimizer=OptimizerConfig(lr=5e-7, warmup_steps=100, total_steps=2000)),
        eval=EvalConfig(num_prompts=256, batch_size=64, max_new_tokens=53),
    )


def _huang_adamw(steps: int, schedule: str = "cosine") -> OptimizerConfig:
    """The optimizer of every stage of Huang et al. 2024: AdamW (torch's, so weight decay 0.01)
    with eps 1e-5 and lr 3e-6, no warm-up, then ``schedule`` (a decay ends at 0)."""
    return OptimizerConfig(lr=3e-6, eps=1e-5, weight_decay=0.01, warmup_steps=0,
                           schedule=schedule, total_steps=steps)


def tldr_pythia() -> PipelineConfig:
    """TL;DR summarisation with Pythia-1B-deduped and the settings of Huang et al. 2024, "The
    N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization" (their
    code: ``vwxyzjn/summarize_from_feedback_details``): one epoch of SFT (batch 128) and of
    RM / DPO training (batch 64), lr 3e-6 everywhere; PPO on 1M episodes in rollouts of 512
    (4 epochs, one minibatch), 53-token summaries at temperature 0.7, a fixed KL coefficient
    of 0.05, a penalty on summaries without EOS, a separate value model initialised from the
    reward model, advantage (not reward) whitening; DPO with beta 0.05. The 2.8B and 6.9B runs
    of the paper use the same numbers (``--policy.path``). Settings the library cannot express
    exactly (reward normalisation, the EOS penalty's form) are listed in
    experiments/tldr.md."""
    sft_steps, pair_steps, ppo_iterations = 911, 1450, 1953  # 116,722 / 128; 92,858 / 64; 1e6 / 512
    return PipelineConfig(
        name="tldr-pythia",
        out_dir=Path("runs/tldr-pythia"),
        # bfloat16 compute on float32 parameters: the paper's bf16 mixed precision
        policy=PolicyConfig(source="hf", path=Path("checkpoints/pythia-1b-deduped"),
                            dtype="bfloat16"),
        data=_tldr_data(),
        sft=SFTStageConfig(steps=sft_steps, batch_size=128, optimizer=_huang_adamw(sft_steps)),
        rm=RMStageConfig(steps=pair_steps, batch_size=64, normalize_prompts=512,
                         optimizer=_huang_adamw(pair_steps)),
        # PPO's lr decays linearly to 0 over the optimizer updates: 4 epochs x 1 minibatch
        # per iteration.
        ppo=PPOStageConfig(iterations=ppo_iterations, batch_size=512,
                           optimizer=_huang_adamw(4 * ppo_iterations, "linear"),
                           value_optimizer=_huang_adamw(4 * ppo_iterations, "linear"),
                           ppo=PPOConfig(sampling=_sampling(53, temperature=0.7), num_ppo_epochs=4,
                                         num_minibatches=1, gamma=1.0, lam=0.95, clip_eps=0.2,
                                         clip_eps_value=0.2, vf_coef=0.1, whiten_rewards=False,
                                         missing_eos_penalty=1.0, value_model="separate",
                                         kl=KLController(kind="fixed", init_kl_coef=0.05))),
        dpo=DPOStageConfig(steps=pair_steps, batch_size=64, dpo=DPOConfig(beta=0.05),
                           optimizer=_huang_adamw(pair_steps)),
        # their validation summaries are sampled at temperature 0.01, i.e. nearly greedy
        eval=EvalConfig(num_prompts=256, batch_size=64, max_new_tokens=53, temperature=0.0),
    )


def gemma3_sentiment() -> PipelineConfig:
    """The main job's task (positive continuations of movie-review openings, a reward model on
    human sentiment ratings, VADER as judge) with Gemma 3 1B-it from ``--policy.path``: every
    block trains, the reward model keeps the full trunk, bfloat16 compute; sized for one
    accelerator (or ``--mesh.fsdp 8`` on a v5e-8). Sampling, KL and PPO settings are the main
    job's. Gemma's tokenizer names ``<eos>`` as its EOS while its chat turns end with
    ``<end_of_turn>``: experiments/gemma_sentiment.md shows the one-line fix to apply after
    downloading."""
    return PipelineConfig(
        name="gemma3-sentiment",
        out_dir=Path("runs/gemma3-sentiment"),
        policy=PolicyConfig(source="hf", path=Path("checkpoints/gemma-3-1b-it"), dtype="bfloat16"),
        # the main job's records; the larger buckets leave room for Gemma's chat markup
        data=DataConfig(domains=("movie_reviews",), margin=1.5, min_words=6, max_words=20,
                        opening_words=3, buckets=(64, 96), prompt_buckets=(32, 48)),
        sft=SFTStageConfig(steps=300, batch_size=32,
                           optimizer=OptimizerConfig(lr=1e-5, warmup_steps=20, schedule="cosine",
                                                     total_steps=300)),
        rm=RMStageConfig(steps=300, batch_size=32, step=RewardConfig(loss="pairwise"),
                         optimizer=OptimizerConfig(lr=1e-5, warmup_steps=20, schedule="cosine",
                                                   total_steps=300),
                         eval_pairs=512, normalize_prompts=128),
        ppo=PPOStageConfig(iterations=100, batch_size=64,
                           optimizer=OptimizerConfig(lr=3e-6, max_grad_norm=1.0),
                           ppo=PPOConfig(sampling=_sampling(20, temperature=0.7, min_new_tokens=10),
                                         num_ppo_epochs=4, num_minibatches=2, vf_coef=0.1,
                                         kl=KLController(kind="fixed", init_kl_coef=0.05))),
        dpo=DPOStageConfig(steps=300, batch_size=32, dpo=DPOConfig(beta=0.1), eval_pairs=512,
                           optimizer=OptimizerConfig(lr=5e-7, warmup_steps=20, total_steps=300)),
        eval=EvalConfig(num_prompts=512, batch_size=64, max_new_tokens=20, min_new_tokens=10,
                        temperature=0.7),
    )


PRESETS = {"smollm2-sentiment": smollm2_sentiment, "smollm2-arithmetic": smollm2_arithmetic,
           "smollm2-arithmetic-rloo": lambda: smollm2_arithmetic("rloo"), "tiny": tiny,
           "gpt2-sentiment": gpt2_sentiment, "tldr": tldr, "tldr-pythia": tldr_pythia,
           "gemma3-sentiment": gemma3_sentiment}


def get_preset(name: str) -> PipelineConfig:
    """The preset called ``name``.

    Raises:
      KeyError: unknown name (lists the known ones).
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()


def with_stages(cfg: PipelineConfig, *stages: str) -> PipelineConfig:
    """``cfg`` restricted to ``stages``."""
    return dataclasses.replace(cfg, stages=tuple(stages))
