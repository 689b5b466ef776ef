"""What sharing the frozen lower layers with the reference saves: a DPO step and a PPO
iteration with the lowest ``--frozen-layers`` blocks frozen, ``reference_shares_frozen_layers``
off and on, timed interleaved (same machine load).

The model is the workload's GPT-2 (``workload.json``, default ``small``): DPO on ``B`` pairs
with the reference forward in the step; PPO on ``B`` prompts with ``--epochs`` x
``--minibatches`` updates per rollout (the main job's 4 x 2 by default), a reward model of the
same shape, fixed KL. In both settings the policy's own frozen blocks already run once per
rollout (``Experience.frozen_hidden``); "on" also skips them in the reference forward.

Run: ``.venv/bin/python -m bench.frozen_layers [--workload small] [--frozen-layers 3]``.
Prints one JSON line per step and setting, with ``speedup`` (off / on median time) on the
"on" line.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import add_workload_args, emit, load_workload, timeit_interleaved
from bench.model_step import model_config
from bench.train_steps import _Runner, optimizer_config, pref_batch
from rlhf_jax.control import KLController
from rlhf_jax.models.model import Model
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.train import dpo, ppo
from rlhf_jax.train.state import create_train_state, make_optimizer


def _dpo_runners(cfg, variant: dict, workload: dict) -> dict:
    model = Model(cfg)
    params = jax.jit(model.init)(jax.random.key(workload["seed"]))
    tx = make_optimizer(optimizer_config(workload["optimizer"]), params,
                        frozen_layers=cfg.frozen_layers)
    b, p, r = variant["batch_size"], variant["prompt_len"], variant["response_len"]
    batch = pref_batch(cfg, b, p, r, workload["seed"])
    runners = {}
    for shared in (False, True):
        step = dpo.make_dpo_step(model, tx, dpo.DPOConfig(reference_shares_frozen_layers=shared))
        runners[("dpo_step", shared)] = _Runner(
            step, create_train_state(params, tx, jax.random.key(1)), batch, params,
            loss_key="dpo/loss")
    return runners


def _ppo_runners(cfg, variant: dict, workload: dict, epochs: int, minibatches: int) -> dict:
    policy, scalar = Model(cfg, kind="lm_value"), Model(cfg, kind="scalar")
    seed = workload["seed"]
    params = jax.jit(policy.init)(jax.random.key(seed))
    reward_params = jax.jit(scalar.init)(jax.random.key(seed + 1))
    b, p, r = variant["batch_size"], variant["prompt_len"], variant["response_len"]
    sampling = SamplingConfig(max_new_tokens=r, eos_token_id=cfg.vocab_size - 1, pad_token_id=0,
                              stop_early=False)
    tx = make_optimizer(optimizer_config(workload["optimizer"]), params,
                        frozen_layers=cfg.frozen_layers)
    rng = np.random.default_rng(seed)
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size - 1, (b, p), dtype=np.int32))
    prompt_mask = jnp.ones((b, p), bool)
    runners = {}
    for shared in (False, True):
        pcfg = ppo.PPOConfig(sampling=sampling, num_ppo_epochs=epochs, num_minibatches=minibatches,
                             kl=KLController(init_kl_coef=workload["ppo"]["kl_coef"]),
                             reference_shares_frozen_layers=shared)
        it = ppo.make_ppo_iteration(policy_model=policy, reward_model=scalar, policy_tx=tx,
                                    cfg=pcfg)
        state = ppo.init_ppo_state(create_train_state(params, tx, jax.random.key(1)), pcfg.kl,
                                   jax.random.key(2))
        runners[("ppo_iteration", shared)] = _Runner(
            it, state, prompts, prompt_mask, params, reward_params, loss_key="objective/score")
    return runners


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(ap)
    ap.set_defaults(workload="small")
    ap.add_argument("--frozen-layers", type=int, default=None,
                    help="frozen lower blocks (default: all but the top one)")
    ap.add_argument("--epochs", type=int, default=4, help="PPO epochs per rollout")
    ap.add_argument("--minibatches", type=int, default=2, help="PPO minibatches per epoch")
    ap.add_argument("--iters", type=int, default=10, help="timed rounds (after 2 warm-up rounds)")
    args = ap.parse_args(argv)

    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    workload, path = load_workload(args.workload_file)
    for name in args.workload.split(","):
        variant = workload["variants"][name]
        cfg = model_config(variant, workload.get("dtype", "float32"))
        frozen = cfg.n_layers - 1 if args.frozen_layers is None else args.frozen_layers
        cfg = dataclasses.replace(cfg, frozen_layers=frozen)
        runners = {**_dpo_runners(cfg, variant, workload),
                   **_ppo_runners(cfg, variant, workload, args.epochs, args.minibatches)}
        times = timeit_interleaved({f"{k[0]}:{k[1]}": fn for k, fn in runners.items()},
                                   warmup=2, iters=args.iters)
        for step in ("dpo_step", "ppo_iteration"):
            off, on = (statistics.median(times[f"{step}:{s}"]) for s in (False, True))
            for shared, sec in ((False, off), (True, on)):
                extra = {"speedup": off / on} if shared else {}
                emit(bench="frozen_layers", workload=name, workload_file=str(path), step=step,
                     reference_shares_frozen_layers=shared, frozen_layers=frozen,
                     n_layers=cfg.n_layers, batch=variant["batch_size"],
                     seq=variant["prompt_len"] + variant["response_len"],
                     epochs=args.epochs, minibatches=args.minibatches, step_s=sec,
                     step_s_min=min(times[f"{step}:{shared}"]), iters=args.iters, **extra)


if __name__ == "__main__":
    sys.exit(main())
