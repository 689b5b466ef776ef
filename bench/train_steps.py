"""Step times of the library's jitted train steps (SFT, reward model, DPO, one PPO iteration,
one GRPO iteration) on the fixed GPT-2 workloads of ``workload.json``.

Unlike ``bench.model_step`` (a bare forward/backward/AdamW of the model), this times the
steps a user runs: ``rlhf_jax.train.{sft,reward,dpo,ppo}`` built with their ``make_*``
factories, the state donated, AdamW from ``rlhf_jax.train.state.make_optimizer`` with the
workload's hyper-parameters (no clipping, constant schedule), float32.

What one timed call is, per workload variant (``B = batch_size``, ``T = prompt_len +
response_len``), and the FLOPs counted (``F(T) = ModelConfig.flops_per_token(T)``: the
forward matmul FLOPs per token incl. attention scores and the LM head; ``Fs(T) = F(T) -
2 d V``: the same without the LM head, for scalar models; training = 3 x forward):

* ``sft_step``  - ``B`` sequences of ``T`` tokens, loss on the last ``response_len``:
  ``3 F(T) B T``.
* ``rm_step``   - ``B/2`` pairs = ``B`` sequences of ``T`` (a ``"scalar"`` model, pairwise
  Bradley-Terry): ``3 Fs(T) B T``.
* ``dpo_step``  - ``B`` pairs = ``2B`` sequences with the reference forward inside the step:
  ``(3 + 1) F(T) 2B T``; ``dpo_over_sft`` is its time over ``sft_step``'s (same ``B``, same
  ``T``; the FLOP ratio is 8/3 = 2.67).
* ``ppo_iteration`` (``small`` only) - ``ppo.make_ppo_iteration``: ``B`` prompts of
  ``prompt_len`` tokens, ``response_len`` new tokens sampled at the workload's settings
  (temperature 1, no top-k/p) with ``stop_early=False`` (always all R steps), a GPT-2
  reward model of the same shape, shared value head, 1 epoch x 1 minibatch, fixed KL 0.05.
  FLOPs: sampling (``bench.sampler.sample_flops``) + three scoring forwards (policy log-probs
  and values, reference, reward model) + the update (forward + backward), with the LM head
  counted on the ``R`` response positions only (``ppo.policy_forward`` projects the ``R + 1``
  positions from ``P - 1`` on; the one extra is not counted):
  ``sample + 5 (Fs(T) T + 2 d V R) B + Fs(T) T B``. Staged phase timings (``ppo_phase``
  lines: sample, score + advantages, update) are diagnostics.
* ``grpo_iteration`` (``small`` only) - ``ppo.make_ppo_iteration`` with the GRPO options of
  the workload's ``grpo`` section: ``prompts`` prompts x ``num_generations`` samples each
  (``PPOConfig.num_samples``; ``B = prompts x num_generations`` completions), ``advantage=
  "grpo"``, an ``"lm"`` policy (no value head, no critic), KL to the reference as a term of
  the loss (``kl_penalty="loss"``, k3, ``beta``), ``loss_aggregation="sequence_mean"``,
  ``clip_eps``, 1 epoch x 1 minibatch; sampling and the reward model as for
  ``ppo_iteration``. FLOPs: the same count as PPO's with ``B`` completions (sampling + policy
  and reference forwards + reward model + update). Staged phases (diagnostics):
  ``grpo_phase_sample`` (``ppo.generate``), ``grpo_phase_score`` (policy and reference
  log-probs, ``ppo.policy_forward``, and the reward model's score), ``grpo_phase_advantage``
  (``losses.advantages.estimate_advantages("grpo", ...)`` alone; no FLOPs counted),
  ``grpo_phase_update`` (``ppo.ppo_update``).

Every step is timed interleaved with an ``n x n`` fp32 matmul (``bench.common``), so
``frac_of_peak`` compares numbers taken under the same machine load; ``cpu_frac_of_peak``
compares FLOPs per CPU-second of this process (steadier on a shared machine). Median over
``timed_steps`` after ``warmup_steps`` (PPO: the workload's ``ppo`` section; GRPO: its
``grpo`` section). The fields are those of ``bench.model_step`` (see ``bench/README.md``),
plus ``dpo_over_sft`` and, on the PPO and GRPO iteration lines, ``sum_of_staged_phases_s``.

On an accelerator (``bench/device.sh``): ``--dtype bfloat16`` sets the compute dtype
(``ModelConfig.dtype``; the parameters and AdamW state stay float32, the workload's
``dtype``, as in training), the interleaved reference matmul then runs in bfloat16 at default
precision (``--matmul-n 8192`` there), and the matmul precision defaults to ``default``
instead of ``highest`` (on an accelerator each timed reference call is 8 products dispatched
back to back, see ``bench.common.make_matmul``). When the chip's peak is known (``bench.devices.PEAKS`` by
``device_kind``, or ``--peak-tflops``), every step line also gets ``achieved_tflops`` (the
FLOPs counted above per median step), ``mfu`` = ``achieved_tflops / peak_bf16_tflops`` (model
FLOPs utilisation against the data-sheet dense bf16 peak; ``mfu_best`` from the fastest step)
and the ``peak_*`` fields; on a backend that reports it, ``device_peak_mem_gb`` (this
process's peak device memory so far). A variant's optional ``step_batch_size`` (e.g.
``{"dpo_step": 2}``) overrides ``batch_size`` for one step (``workload_device.json``). Without
these options and on CPU the lines are those described above.

Run: ``.venv/bin/python -m bench.train_steps --workload all`` (see ``bench/README.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import add_workload_args, emit, load_workload, make_matmul, timeit_interleaved
from bench.devices import (add_peak_args, describe_peak, memory_peak_gb, on_accelerator,
                           peak_fields)
from bench.model_step import model_config
from bench.sampler import sample_flops
from rlhf_jax.config import ModelConfig
from rlhf_jax.control import KLController
from rlhf_jax.losses.advantages import estimate_advantages
from rlhf_jax.losses.ppo import kl_shaped_rewards
from rlhf_jax.models.model import Model
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.train import dpo, ppo, reward, sft
from rlhf_jax.train.common import sequence_scores
from rlhf_jax.train.state import OptimizerConfig, create_train_state, make_optimizer
from rlhf_jax.types import PreferenceBatch, SFTBatch


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Command-line options that change the steps or add fields (defaults: neither).

    Attributes:
      dtype: compute dtype (``ModelConfig.dtype``); ``None``: the workload's ``dtype``. The
        parameters are stored in the workload's ``dtype`` either way.
      remat: ``ModelConfig.remat``.
      peak: ``bench.devices.peak_fields`` of the chip (``{}``: unknown, no ``mfu``).
    """

    dtype: str | None = None
    remat: bool = False
    peak: dict = dataclasses.field(default_factory=dict)

    def config(self, variant: dict, workload: dict) -> ModelConfig:
        """The variant's ``ModelConfig`` under these options."""
        stored = workload.get("dtype", "float32")
        extra = {"remat": True} if self.remat else {}
        return model_config(variant, self.dtype or stored, param_dtype=stored, **extra)

    def common(self, workload: dict) -> dict:
        """Fields added to every line when an option is set (none by default): ``param_dtype``
        with ``dtype`` (the ``dtype`` field is the compute dtype), ``remat``."""
        out = {}
        if self.dtype is not None:
            out["param_dtype"] = workload.get("dtype", "float32")
        if self.remat:
            out["remat"] = True
        return out


DEFAULT_OPTIONS = RunOptions()


def optimizer_config(opt: dict) -> OptimizerConfig:
    """The workload's AdamW as an ``OptimizerConfig`` (constant lr, no clipping)."""
    if opt.get("name", "adamw") != "adamw":
        raise ValueError(f"optimizer {opt['name']!r} not supported (adamw only)")
    b1, b2 = opt["betas"]
    return OptimizerConfig(lr=opt["lr"], b1=b1, b2=b2, eps=opt["eps"],
                           weight_decay=opt["weight_decay"], max_grad_norm=0.0,
                           schedule="constant")


def head_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of the vocabulary projection per token (``2 d V``)."""
    return 2 * cfg.d_model * cfg.vocab_size


def sft_batch(cfg: ModelConfig, b: int, p: int, r: int, seed: int) -> SFTBatch:
    """``B`` unpadded random sequences of ``P + R`` tokens; targets = the last ``R``."""
    rng = np.random.default_rng(seed)
    t = p + r
    tokens = rng.integers(0, cfg.vocab_size, (b, t), dtype=np.int32)
    return SFTBatch(tokens=jnp.asarray(tokens), attn_mask=jnp.ones((b, t), bool),
                    positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                    loss_mask=jnp.asarray(np.arange(t)[None, :].repeat(b, 0) >= p))


def pref_batch(cfg: ModelConfig, pairs: int, p: int, r: int, seed: int) -> PreferenceBatch:
    """``pairs`` x 2 random sequences ``[B, 2, P + R]`` sharing each pair's prompt."""
    rng = np.random.default_rng(seed)
    t = p + r
    tokens = rng.integers(0, cfg.vocab_size, (pairs, 2, t), dtype=np.int32)
    tokens[:, 1, :p] = tokens[:, 0, :p]
    shape = (pairs, 2, t)
    return PreferenceBatch(tokens=jnp.asarray(tokens), attn_mask=jnp.ones(shape, bool),
                           positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), shape),
                           loss_mask=jnp.broadcast_to(jnp.arange(t) >= p, shape),
                           valid=jnp.ones((pairs, 2), bool))


class _Runner:
    """A jitted step and its (donated) state: ``runner()`` runs one step, returns the loss."""

    def __init__(self, step, state, *args, loss_key: str):
        self.step, self.state, self.args, self.loss_key = step, state, args, loss_key
        t0 = time.perf_counter()
        first = jax.block_until_ready(self())
        self.compile_s = time.perf_counter() - t0
        self.first_loss = float(first) if isinstance(first, jax.Array) and first.ndim == 0 else None

    def __call__(self):
        self.state, metrics = self.step(self.state, *self.args)
        s, c = metrics[self.loss_key]
        return s / jnp.maximum(c, 1.0)


def _measure(runners: dict, flops: dict, matmul, warmup: int, iters: int, common: dict,
             extra: dict | None = None, device: dict | None = None) -> dict[str, dict]:
    """Time ``runners`` interleaved with the matmul; the lines to emit, one per runner.

    ``device``: ``bench.devices.peak_fields`` (adds ``achieved_tflops``, ``mfu``, ``mfu_best``
    and the ``peak_*`` fields when it holds a FLOP/s peak)."""
    mm_fn, mm_flops = matmul
    cpu: dict[str, list[float]] = {}
    times = timeit_interleaved({**runners, "matmul": mm_fn}, warmup, iters, cpu_out=cpu)
    peak = mm_flops / statistics.median(times["matmul"]) / 1e9
    peak_best = mm_flops / min(times["matmul"]) / 1e9
    mm_cpu = statistics.median(cpu["matmul"])
    out = {}
    for name, r in runners.items():
        sec = statistics.median(times[name])
        gflops = flops[name] / sec / 1e9
        step_cpu = statistics.median(cpu[name])
        out[name] = line = dict(bench=name, **common, compile_s=round(r.compile_s, 2), step_s=sec,
                         step_s_min=min(times[name]), iters=iters,
                         gflop_per_step=flops[name] / 1e9, gflops=gflops,
                         matmul_peak_gflops=peak, matmul_peak_gflops_best=peak_best,
                         frac_of_peak=gflops / peak,
                         best_frac_of_peak=flops[name] / min(times[name]) / 1e9 / peak_best,
                         step_cpu_s=step_cpu, matmul_cpu_s=mm_cpu,
                         cpu_frac_of_peak=(flops[name] / step_cpu) / (mm_flops / mm_cpu),
                         **({} if r.first_loss is None else {"first_loss": r.first_loss}))
        line.update((extra or {}).get(name, {}))  # may replace "batch" (step_batch_size)
        if device and device.get("peak_bf16_tflops"):
            tflops = flops[name] / sec / 1e12
            line.update(achieved_tflops=tflops, mfu=tflops / device["peak_bf16_tflops"],
                        mfu_best=flops[name] / min(times[name]) / 1e12
                        / device["peak_bf16_tflops"], **device)
    mem = memory_peak_gb()
    if mem is not None:
        for line in out.values():
            line["device_peak_mem_gb"] = mem
    return out


def bench_steps(name: str, variant: dict, workload: dict, matmul, *, which: list[str],
                opts: RunOptions = DEFAULT_OPTIONS) -> list:
    cfg = opts.config(variant, workload)
    b, p, r = variant["batch_size"], variant["prompt_len"], variant["response_len"]
    step_b = variant.get("step_batch_size", {})
    t = p + r
    warmup, iters = variant["warmup_steps"], variant["timed_steps"]
    seed = workload["seed"]
    lm, scalar = Model(cfg), Model(cfg, kind="scalar")
    params = jax.jit(lm.init)(jax.random.key(seed))
    opt = optimizer_config(workload["optimizer"])
    f_lm, f_sc = cfg.flops_per_token(t), cfg.flops_per_token(t) - head_flops(cfg)
    common = dict(workload=name, batch=b, seq=t, num_params=lm.num_params(params),
                  dtype=cfg.dtype, matmul_precision=jax.config.jax_default_matmul_precision,
                  **opts.common(workload))
    d = workload.get("dpo", {})
    dpo_cfg = dpo.DPOConfig(beta=d.get("beta", 0.1), loss_type=d.get("loss_type", "sigmoid"))

    def build(kind: str) -> tuple[_Runner, int, dict]:
        b = step_b.get(kind, variant["batch_size"])
        if kind == "sft_step":
            tx = make_optimizer(opt, params)
            state = create_train_state(params, tx, jax.random.key(1))
            return (_Runner(sft.make_sft_step(lm, tx), state, sft_batch(cfg, b, p, r, seed),
                            loss_key="sft/loss"), 3 * f_lm * b * t,
                    {"sequences": b, **({"batch": b} if b != variant["batch_size"] else {})})
        if kind == "rm_step":
            rparams = {"trunk": params["trunk"],
                       "value_head": jax.jit(scalar.init)(jax.random.key(seed + 1))["value_head"]}
            tx = make_optimizer(opt, rparams)
            state = create_train_state(rparams, tx, jax.random.key(1))
            return (_Runner(reward.make_reward_step(scalar, tx), state,
                            pref_batch(cfg, b // 2, p, r, seed), loss_key="rm/loss"),
                    3 * f_sc * b * t, {"pairs": b // 2, "sequences": b,
                                       **({"batch": b} if b != variant["batch_size"] else {})})
        if kind == "dpo_step":
            tx = make_optimizer(opt, params)
            state = create_train_state(params, tx, jax.random.key(1))
            return (_Runner(dpo.make_dpo_step(lm, tx, dpo_cfg), state,
                            pref_batch(cfg, b, p, r, seed), params, loss_key="dpo/loss"),
                    4 * f_lm * 2 * b * t, {"pairs": b, "sequences": 2 * b,
                                           "loss_type": dpo_cfg.loss_type,
                                           **({"batch": b} if b != variant["batch_size"] else {})})
        raise ValueError(kind)

    runners, flops, extra = {}, {}, {}
    for kind in which:
        runners[kind], flops[kind], extra[kind] = build(kind)
    lines = _measure(runners, flops, matmul, warmup, iters, common, extra, opts.peak)
    if ("sft_step" in lines and "dpo_step" in lines
            and lines["sft_step"]["batch"] == lines["dpo_step"]["batch"]):
        dpo_line = lines["dpo_step"]
        dpo_line["dpo_over_sft"] = dpo_line["step_s"] / lines["sft_step"]["step_s"]
    return [emit(**line) for line in lines.values()]


def rollout_sampling(cfg: ModelConfig, s: dict, r: int) -> SamplingConfig:
    """The workload's ``sampling`` section as a ``SamplingConfig`` of ``r`` new tokens (all of
    them drawn: no early stop; the last id is EOS, 0 is padding)."""
    return SamplingConfig(max_new_tokens=r, temperature=s.get("temperature", 1.0),
                          top_k=s.get("top_k", 0), top_p=s.get("top_p", 1.0),
                          greedy=not s.get("do_sample", True),
                          eos_token_id=cfg.vocab_size - 1, pad_token_id=0, stop_early=False)


def fused_iteration(cfg, policy, scalar, tx, pcfg, params, reward_params, prompts, prompt_mask,
                    b: int, p: int, r: int):
    """``(fresh, runner, f_sc, f_pol, flops_sample)``: a factory of fresh ``PPOState`` s, the
    fused ``make_ppo_iteration`` runner on ``prompts``, and the FLOP counts of one scoring
    token (``f_sc``, no LM head), one policy/reference forward per completion (``f_pol``: the
    head on the ``r`` response positions only) and of sampling ``b`` completions."""
    t = p + r

    def fresh():
        return ppo.init_ppo_state(create_train_state(params, tx, jax.random.key(1)), pcfg.kl,
                                  jax.random.key(2))

    it = ppo.make_ppo_iteration(policy_model=policy, reward_model=scalar, policy_tx=tx, cfg=pcfg)

    class Fused(_Runner):
        def __call__(self):
            self.state, m = self.step(self.state, prompts, prompt_mask, params, reward_params)
            return m["objective/score"][0]

    f_sc = cfg.flops_per_token(t) - head_flops(cfg)
    f_pol = f_sc * t + head_flops(cfg) * r
    return fresh, Fused(it, fresh(), loss_key=""), f_sc, f_pol, sample_flops(cfg, b, p, r)


def bench_ppo(name: str, variant: dict, workload: dict, matmul,
              opts: RunOptions = DEFAULT_OPTIONS) -> list:
    cfg = opts.config(variant, workload)
    b, p, r = variant["batch_size"], variant["prompt_len"], variant["response_len"]
    t = p + r
    w = workload["ppo"]
    s = workload.get("sampling", {})
    seed = workload["seed"]
    policy, scalar = Model(cfg, kind="lm_value"), Model(cfg, kind="scalar")
    params = jax.jit(policy.init)(jax.random.key(seed))
    reward_params = jax.jit(scalar.init)(jax.random.key(seed + 1))
    sampling = rollout_sampling(cfg, s, r)
    pcfg = ppo.PPOConfig(sampling=sampling, num_ppo_epochs=w["num_ppo_epochs"],
                         num_minibatches=w["num_mini_batches"], gamma=w["gamma"], lam=w["lam"],
                         clip_eps=w["cliprange"], clip_eps_value=w["cliprange_value"],
                         vf_coef=w["vf_coef"], kl=KLController(init_kl_coef=w["kl_coef"]))
    tx = make_optimizer(optimizer_config(workload["optimizer"]), params)
    rng = np.random.default_rng(seed)
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size - 1, (b, p), dtype=np.int32))
    prompt_mask = jnp.ones((b, p), bool)

    fresh, runner, f_sc, f_pol, flops_sample = fused_iteration(
        cfg, policy, scalar, tx, pcfg, params, reward_params, prompts, prompt_mask, b, p, r)
    flops = {"ppo_iteration": flops_sample + 5 * f_pol * b + f_sc * t * b}
    runners = {"ppo_iteration": runner}

    # Staged phases (diagnostics): the same pure phases, one jit each.
    gen = jax.jit(lambda st: ppo.generate(st, prompts, prompt_mask, policy_model=policy, cfg=pcfg))

    def score_fn(st, tokens, attn_mask, positions, response_mask, ended):
        scores = sequence_scores(scalar, reward_params, tokens, positions, attn_mask)
        return ppo.make_experience(st, tokens, attn_mask, positions, response_mask, ended, scores,
                                   params, policy_model=policy, value_model=None, cfg=pcfg)[0]

    score = jax.jit(score_fn)
    update = jax.jit(lambda st, exp: ppo.ppo_update(st, exp, policy_model=policy, value_model=None,
                                                    policy_tx=tx, value_tx=None, cfg=pcfg)[0])
    st0 = fresh()
    out, tokens, attn_mask, positions = gen(st0)
    exp = score(st0, tokens, attn_mask, positions, out.response_mask, out.ended)

    class Phase(_Runner):
        def __call__(self):
            return self.step(*self.args)

    runners["ppo_phase_sample"] = Phase(gen, None, st0, loss_key="")
    runners["ppo_phase_score"] = Phase(score, None, st0, tokens, attn_mask, positions,
                                       out.response_mask, out.ended, loss_key="")
    runners["ppo_phase_update"] = Phase(lambda st, e: update(st, e).policy.step, None, st0, exp,
                                        loss_key="")
    flops["ppo_phase_sample"] = flops_sample
    flops["ppo_phase_score"] = 2 * f_pol * b + f_sc * t * b
    flops["ppo_phase_update"] = 3 * f_pol * b
    for runner in runners.values():
        runner.first_loss = None  # a score / a step count here, not a loss
    common = dict(workload=name, batch=b, prompt_len=p, new_tokens=r, seq=t,
                  num_params=policy.num_params(params), dtype=cfg.dtype,
                  matmul_precision=jax.config.jax_default_matmul_precision,
                  stop_early=False, epochs=pcfg.num_ppo_epochs,
                  minibatches=pcfg.num_minibatches, **opts.common(workload))
    lines = _measure(runners, flops, matmul, w["warmup_iterations"], w["timed_iterations"], common,
                     device=opts.peak)
    phases = sum(lines[k]["step_s"] for k in lines if k.startswith("ppo_phase"))
    lines["ppo_iteration"]["sum_of_staged_phases_s"] = phases
    return [emit(**line) for line in lines.values()]


def bench_grpo(name: str, variant: dict, workload: dict, matmul,
               opts: RunOptions = DEFAULT_OPTIONS) -> list:
    """One GRPO iteration (fused) and its staged phases on the ``grpo`` section's shapes."""
    cfg = opts.config(variant, workload)
    p, r = variant["prompt_len"], variant["response_len"]
    t = p + r
    g = workload["grpo"]
    k, n_prompts = g["num_generations"], g["prompts"]
    b = n_prompts * k  # completions
    s = workload.get("sampling", {})
    seed = workload["seed"]
    policy, scalar = Model(cfg, kind="lm"), Model(cfg, kind="scalar")
    params = jax.jit(policy.init)(jax.random.key(seed))
    reward_params = jax.jit(scalar.init)(jax.random.key(seed + 1))
    sampling = rollout_sampling(cfg, s, r)
    pcfg = ppo.PPOConfig(sampling=sampling, num_samples=k, advantage="grpo", policy_loss="ppo",
                         loss_aggregation="sequence_mean", kl_penalty="loss",
                         kl_estimator=g.get("kl_estimator", "k3"),
                         kl=KLController(init_kl_coef=g["beta"]),
                         num_ppo_epochs=g["num_ppo_epochs"], num_minibatches=g["num_mini_batches"],
                         clip_eps=g.get("clip_eps", 0.2))
    tx = make_optimizer(optimizer_config(workload["optimizer"]), params)
    rng = np.random.default_rng(seed)
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size - 1, (n_prompts, p), dtype=np.int32))
    prompt_mask = jnp.ones((n_prompts, p), bool)

    fresh, runner, f_sc, f_pol, flops_sample = fused_iteration(
        cfg, policy, scalar, tx, pcfg, params, reward_params, prompts, prompt_mask, b, p, r)
    flops = {"grpo_iteration": flops_sample + 5 * f_pol * b + f_sc * t * b}
    runners = {"grpo_iteration": runner}

    # Staged phases (diagnostics), one jit each.
    gen = jax.jit(lambda st: ppo.generate(st, prompts, prompt_mask, policy_model=policy, cfg=pcfg))

    def score_fn(st, tokens, attn_mask, positions, response_mask):
        """Policy and reference log-probs of the response, and the reward model's score."""
        scores = sequence_scores(scalar, reward_params, tokens, positions, attn_mask)
        logp, _, _ = ppo.policy_forward(policy, st.policy.params, tokens, positions, attn_mask,
                                        p, sampling)
        ref_logp, _, _ = ppo.policy_forward(policy, params, tokens, positions, attn_mask, p,
                                            sampling)
        mask = response_mask.astype(bool)
        return scores, jnp.where(mask, logp, 0.0), jnp.where(mask, ref_logp, 0.0)

    score = jax.jit(score_fn)
    advantage = jax.jit(lambda rewards, mask: estimate_advantages(
        pcfg.advantage, rewards, mask, group_size=k, gamma=pcfg.gamma, lam=pcfg.lam,
        whiten_advantages=pcfg.whiten_advantages)[0])
    update = jax.jit(lambda st, exp: ppo.ppo_update(st, exp, policy_model=policy, value_model=None,
                                                    policy_tx=tx, value_tx=None, cfg=pcfg)[0])
    st0 = fresh()
    out, tokens, attn_mask, positions = gen(st0)
    mask = out.response_mask.astype(bool)
    scores, _, _ = score(st0, tokens, attn_mask, positions, out.response_mask)
    # the rewards the advantage phase reads: the score on the last token (KL in the loss)
    rewards, _ = jax.jit(lambda sc, m: kl_shaped_rewards(sc, jnp.zeros(m.shape), jnp.zeros(m.shape),
                                                         m, 0.0))(scores, mask)
    exp = jax.jit(lambda st, tok, am, pos, rm, e, sc: ppo.make_experience(
        st, tok, am, pos, rm, e, sc, params, policy_model=policy, value_model=None, cfg=pcfg)[0])(
        st0, tokens, attn_mask, positions, out.response_mask, out.ended, scores)

    class Phase(_Runner):
        def __call__(self):
            return self.step(*self.args)

    runners["grpo_phase_sample"] = Phase(gen, None, st0, loss_key="")
    runners["grpo_phase_score"] = Phase(score, None, st0, tokens, attn_mask, positions,
                                        out.response_mask, loss_key="")
    runners["grpo_phase_advantage"] = Phase(advantage, None, rewards, mask, loss_key="")
    runners["grpo_phase_update"] = Phase(lambda st, e: update(st, e).policy.step, None, st0, exp,
                                         loss_key="")
    flops["grpo_phase_sample"] = flops_sample
    flops["grpo_phase_score"] = 2 * f_pol * b + f_sc * t * b
    flops["grpo_phase_advantage"] = 0
    flops["grpo_phase_update"] = 3 * f_pol * b
    for runner in runners.values():
        runner.first_loss = None  # a score / a step count here, not a loss
    common = dict(workload=name, batch=b, prompts=n_prompts, num_generations=k, prompt_len=p,
                  new_tokens=r, seq=t, num_params=policy.num_params(params), dtype=cfg.dtype,
                  matmul_precision=jax.config.jax_default_matmul_precision,
                  stop_early=False, epochs=pcfg.num_ppo_epochs,
                  minibatches=pcfg.num_minibatches, advantage=pcfg.advantage,
                  kl_penalty=pcfg.kl_penalty, kl_estimator=pcfg.kl_estimator,
                  kl_coef=pcfg.kl.init_kl_coef, loss_aggregation=pcfg.loss_aggregation,
                  **opts.common(workload))
    lines = _measure(runners, flops, matmul, g["warmup_iterations"], g["timed_iterations"], common,
                     device=opts.peak)
    phases = sum(lines[n]["step_s"] for n in lines if n.startswith("grpo_phase"))
    lines["grpo_iteration"]["sum_of_staged_phases_s"] = phases
    return [emit(**line) for line in lines.values()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(ap)
    ap.add_argument("--steps", default="sft,rm,dpo,ppo,grpo",
                    help="which of sft, rm, dpo, ppo, grpo (ppo and grpo run on 'small' only)")
    ap.add_argument("--separate", action="store_true",
                    help="time the steps of a variant one after another (less memory) instead "
                         "of interleaved with each other")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="compute dtype (ModelConfig.dtype); parameters and AdamW state stay in "
                         "the workload's dtype (float32). Default: the workload's dtype")
    ap.add_argument("--remat", action="store_true", help="ModelConfig.remat=True")
    ap.add_argument("--warmup-steps", type=int, default=None,
                    help="replace the variants' warmup_steps (SFT/RM/DPO)")
    ap.add_argument("--timed-steps", type=int, default=None,
                    help="replace the variants' timed_steps (SFT/RM/DPO)")
    add_peak_args(ap)
    # default: highest (true fp32) for float32 compute, default for bfloat16 (see below)
    ap.set_defaults(matmul_precision=None)
    args = ap.parse_args(argv)
    unknown = set(args.steps.split(",")) - {"sft", "rm", "dpo", "ppo", "grpo"}
    if unknown:
        raise SystemExit(f"unknown --steps {sorted(unknown)}; have sft, rm, dpo, ppo, grpo")

    low = args.dtype not in (None, "float32")
    precision = args.matmul_precision or ("default" if low else "highest")
    jax.config.update("jax_default_matmul_precision", precision)
    workload, path = load_workload(args.workload_file)
    names = list(workload["variants"]) if args.workload == "all" else args.workload.split(",")
    steps = args.steps.split(",")
    peak = peak_fields(args.peak_tflops, args.hbm_gbs)
    opts = RunOptions(dtype=args.dtype, remat=args.remat, peak=peak)
    if low:  # the reference matmul in the compute dtype, one bf16 pass (fp32 accumulation);
        # on an accelerator 8 products per timed call, so the host's wait is not timed 8 times
        matmul = make_matmul(args.matmul_n, args.dtype, precision=jax.lax.Precision.DEFAULT,
                             repeat=8 if on_accelerator() else 1)
    else:
        matmul = make_matmul(args.matmul_n)
    extra = {}
    if args.dtype is not None or peak:
        extra = dict(compute_dtype=args.dtype or workload.get("dtype", "float32"),
                     param_dtype=workload.get("dtype", "float32"),
                     matmul_dtype=args.dtype or "float32", matmul_precision=precision, **peak)
    print(f"bench.train_steps: {describe_peak(peak)}", file=sys.stderr, flush=True)
    emit(bench="train_steps_config", workload_file=str(path), workloads=names, steps=steps,
         matmul_n=args.matmul_n, **extra)
    for n in names:
        if n not in workload["variants"]:
            raise SystemExit(f"unknown workload {n!r} in {path}; have {list(workload['variants'])}")
        variant = dict(workload["variants"][n])
        if args.warmup_steps is not None:
            variant["warmup_steps"] = args.warmup_steps
        if args.timed_steps is not None:
            variant["timed_steps"] = args.timed_steps
        which = [f"{k}_step" for k in ("sft", "rm", "dpo") if k in steps]
        groups = [[k] for k in which] if args.separate else ([which] if which else [])
        if not args.separate and "sft_step" in which and "dpo_step" in which and n != "small":
            # Large models: SFT + DPO together (their ratio), the RM on its own (memory).
            groups = [[k for k in which if k != "rm_step"]]
            groups += [["rm_step"]] if "rm_step" in which else []
        for g in groups:
            bench_steps(n, variant, workload, matmul, which=g, opts=opts)
        if "ppo" in steps and n == "small":
            bench_ppo(n, variant, workload, matmul, opts)
        if "grpo" in steps and n == "small":
            if "grpo" not in workload:
                print(f"train_steps: no 'grpo' section in {path}; GRPO skipped", file=sys.stderr)
            else:
                bench_grpo(n, variant, workload, matmul, opts)


if __name__ == "__main__":
    sys.exit(main())
