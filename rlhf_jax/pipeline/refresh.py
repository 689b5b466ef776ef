"""Iterated RLHF: refresh the proxy reward model with fresh comparisons of the current
policy's samples during RL (``ppo.refresh_every``).

Ouyang et al. 2022 (§3.5, §C) and Bai et al. 2022 (§4.5, "iterated online RLHF") collect new
human comparisons of the current policy's samples and retrain the reward model, so that it
stays accurate where the policy has moved; Gao et al. 2023 (§5) and Coste et al. 2023 frame
it as a remedy for reward-model overoptimization. Here the human raters are simulated by the
task's *gold* reward (``Task.gold_score``), as in Gao et al.'s synthetic setup:

Every ``M = ppo.refresh_every`` RL iterations, at the start of the iteration:

1. ``ppo.refresh_pairs`` prompts from the RL prompt stream (seeded by the round) get two
   responses each from the current policy (one sampler call, the RL sampling settings);
2. the gold reward scores both, and a label is drawn from the Bradley-Terry model on the
   gold scores with temperature ``T = ppo.refresh_temperature``:
   ``P(a > b) = sigmoid((g_a - g_b) / T)`` (Bradley & Terry 1952; a noisy stand-in for human
   raters, whose agreement is well below 100%);
3. the pairs join a buffer of every round's comparisons, and the proxy reward model takes
   ``ppo.refresh_steps`` optimizer steps that alternate between a batch drawn uniformly from
   that buffer (new comparisons) and the next batch of the original human comparisons (old
   ones), with the reward stage's loss and optimizer settings at a constant learning rate;
4. RL continues against the refreshed reward model. Its normalisation (gain and bias from the
   reward stage) is kept, so the reward's scale stays comparable across rounds.

Everything lives in the RL loop's state (``RefreshState``: the PPO state, the reward model's
train state, the comparison buffer and the iteration counter), so a checkpoint taken at any
iteration holds the refreshed reward model and the buffer: a killed run resumes mid-round
exactly where it was.

Metrics of a refresh (logged with that iteration's row): ``refresh/round``,
``refresh/proxy_accuracy`` (the proxy's agreement with the gold labels on the new pairs
*before* training on them: how far the policy's samples have drifted out of the proxy's
competence), ``refresh/gold_gap`` (mean |g_a - g_b|), ``refresh/rm_loss``, and
``refresh/pairs`` (buffer size).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rlhf_jax.models.model import Model, Params
from rlhf_jax.pipeline.run import Run, gather_rows, local_rows
from rlhf_jax.rollout.postprocess import decode
from rlhf_jax.rollout.sampler import make_sampler
from rlhf_jax.train.common import sequence_scores
from rlhf_jax.train.ppo import PPOState
from rlhf_jax.train.reward import make_reward_step
from rlhf_jax.train.state import TrainState
from rlhf_jax.types import PreferenceBatch, positions_from_mask

#: Defaults of the ``ppo.refresh_*`` fields left unset (``None``).
DEFAULT_PAIRS, DEFAULT_STEPS, DEFAULT_TEMPERATURE = 64, 16, 0.1


@struct.dataclass
class RefreshState:
    """The RL loop's state with a refreshed reward model.

    Attributes:
      ppo: the ``PPOState``.
      rm: the proxy reward model's ``TrainState``.
      iteration: ``[] int32`` RL iterations done (host NumPy, like the buffer).
      pairs_tokens: ``[capacity, 2, T] int32`` the comparisons collected so far (chosen
        first), left-padded to ``T``; rows ``>= num_pairs`` are unused.
      pairs_mask: ``[capacity, 2, T] bool``.
      num_pairs: ``[] int32`` filled rows (host).
    """

    ppo: PPOState
    rm: TrainState
    iteration: jax.Array
    pairs_tokens: jax.Array
    pairs_mask: jax.Array
    num_pairs: jax.Array

    @property
    def policy(self):
        """The policy's ``TrainState`` (as ``PPOState.policy``)."""
        return self.ppo.policy


def bradley_terry_labels(gold_a: np.ndarray, gold_b: np.ndarray, temperature: float,
                         rng: np.random.Generator) -> np.ndarray:
    """``[B] bool``: True where response a is labelled preferred.

    Each label is one draw from the Bradley-Terry model on the gold scores,
    ``P(a > b) = sigmoid((g_a - g_b) / T)`` (Bradley & Terry 1952); ``T -> 0`` is the
    noiseless gold preference, large ``T`` a coin flip.

    Raises:
      ValueError: ``temperature <= 0`` or shapes that differ.
    """
    gold_a, gold_b = np.asarray(gold_a, np.float64), np.asarray(gold_b, np.float64)
    if temperature <= 0 or gold_a.shape != gold_b.shape:
        raise ValueError(f"bradley_terry_labels: temperature={temperature} must be > 0 and "
                         f"shapes {gold_a.shape} / {gold_b.shape} equal")
    p = 0.5 * (1.0 + np.tanh((gold_a - gold_b) / (2.0 * temperature)))  # sigmoid, stable
    return rng.random(gold_a.shape) < p


def _left_pad(x: np.ndarray, length: int, value) -> np.ndarray:
    pad = length - x.shape[-1]
    if pad < 0:
        raise ValueError(f"sequence of {x.shape[-1]} tokens exceeds the buffer length {length}")
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, 0)], constant_values=value)


def preference_batch(tokens: np.ndarray, mask: np.ndarray) -> PreferenceBatch:
    """A pairwise ``PreferenceBatch`` from ``[B, 2, T]`` chosen-first tokens and masks
    (positions from the mask; every candidate valid; the reward model reads no loss mask)."""
    mask = np.asarray(mask, bool)
    return PreferenceBatch(tokens=np.asarray(tokens, np.int32), attn_mask=mask,
                           positions=np.asarray(positions_from_mask(jnp.asarray(mask))),
                           loss_mask=mask, valid=np.ones(mask.shape[:2], bool))


@dataclasses.dataclass
class Refresher:
    """Builds and runs refresh rounds for one RL stage (see the module docstring).

    Attributes:
      run: the pipeline run.
      policy: the policy ``Model``.
      rm: the proxy reward model (``kind="scalar"``).
      tx: the reward model's optimizer (one round's steps use it; constant rate).
      rm_sharding: the reward model's ``TrainState`` shardings.
      length: ``T`` of the buffer: the longest RL prompt bucket plus the response length.
    """

    run: Run
    policy: Model
    rm: Model
    tx: object
    rm_sharding: object
    length: int

    def __post_init__(self):
        c = self.run.cfg.ppo
        self.every = c.refresh_every
        self.pairs = c.refresh_pairs or DEFAULT_PAIRS
        self.steps = c.refresh_steps or DEFAULT_STEPS
        self.temperature = c.refresh_temperature or DEFAULT_TEMPERATURE
        self.rounds = max(0, (c.iterations - 1) // self.every)
        self.batch = c.batch_size
        self.sampler = make_sampler(self.policy, self.run.sampling(c.ppo.sampling), num_samples=2)
        rm_cfg = self.run.cfg.rm
        self.rm_batch = rm_cfg.batch_size
        self.rm_step = make_reward_step(self.rm, self.tx, rm_cfg.step,
                                        state_sharding=self.rm_sharding,
                                        batch_sharding=self.run.batch_sharding())
        self.score = jax.jit(lambda p, t, pos, m: sequence_scores(self.rm, p, t, pos, m),
                             out_shardings=self.run.batch_sharding())

    @property
    def capacity(self) -> int:
        """Buffer rows: every round's new pairs (prompt batches are whole)."""
        return self.rounds * self._prompt_batches() * self.batch

    def _prompt_batches(self) -> int:
        return max(1, math.ceil(self.pairs / self.batch))

    def init_state(self, ppo_state: PPOState, rm_state: TrainState) -> RefreshState:
        """The loop's initial state: no comparisons yet, iteration 0."""
        cap = max(self.capacity, 1)
        # host leaves (the counters and the buffer are read and written on the host)
        return RefreshState(ppo=ppo_state, rm=rm_state, iteration=np.zeros((), np.int32),
                            pairs_tokens=np.zeros((cap, 2, self.length), np.int32),
                            pairs_mask=np.zeros((cap, 2, self.length), bool),
                            num_pairs=np.zeros((), np.int32))

    def due(self, iteration: int) -> bool:
        """Whether a refresh round runs before RL iteration ``iteration`` (0-based)."""
        return bool(self.every) and iteration > 0 and iteration % self.every == 0

    def _new_pairs(self, state: RefreshState, round_: int):
        """Sample, gold-label and return ``(tokens [n, 2, T], mask, metrics)`` (all processes
        hold every row)."""
        run = self.run
        data = run.prompt_dataset("prompts")
        bcfg = run.batch_config(self.batch, seed_offset=3)
        bcfg = dataclasses.replace(bcfg, seed=bcfg.seed + 7919 * round_)
        stream = run.batches(data, bcfg)
        tokens, masks, gold, proxy = [], [], [], []
        with jax.set_mesh(run.mesh):
            for i in range(self._prompt_batches()):
                batch = run.place(next(stream))
                key = jax.random.key(run.cfg.seed + 104_729 * (round_ + 1) + i)
                s = self.sampler(state.ppo.policy.params, batch.tokens, batch.attn_mask, key)
                p_len = batch.tokens.shape[1]
                seq, seq_mask = local_rows(s.tokens), local_rows(s.attn_mask)
                index = np.repeat(local_rows(batch.index), 2)
                prompts = decode(run.tokenizer, seq[:, :p_len], seq_mask[:, :p_len])
                responses = [data.prefixes[j] + t for j, t in zip(
                    index, decode(run.tokenizer, seq[:, p_len:], seq_mask[:, p_len:]))]
                columns = {n: [col[j] for j in index] for n, col in data.columns.items()}
                gold.append(gather_rows(run.task.gold_score(prompts, responses, columns)))
                proxy.append(gather_rows(local_rows(
                    self.score(state.rm.params, s.tokens, s.positions, s.attn_mask))))
                tokens.append(_left_pad(gather_rows(seq), self.length, 0))
                masks.append(_left_pad(gather_rows(seq_mask), self.length, False))
        tokens = np.concatenate(tokens).reshape(-1, 2, self.length)  # rows 2g, 2g+1: prompt g
        masks = np.concatenate(masks).reshape(-1, 2, self.length)
        gold = np.concatenate(gold).reshape(-1, 2)
        proxy = np.concatenate(proxy).reshape(-1, 2)
        rng = np.random.default_rng([run.cfg.seed, 31, round_])
        first = bradley_terry_labels(gold[:, 0], gold[:, 1], self.temperature, rng)
        order = np.where(first[:, None], [0, 1], [1, 0])  # chosen first
        rows = np.arange(len(order))[:, None]
        tokens, masks = tokens[rows, order], masks[rows, order]
        chosen_proxy = proxy[rows, order]
        metrics = {"refresh/round": float(round_),
                   "refresh/proxy_accuracy": float(np.mean(chosen_proxy[:, 0] > chosen_proxy[:, 1])),
                   "refresh/gold_gap": float(np.mean(np.abs(gold[:, 0] - gold[:, 1])))}
        return tokens, masks, metrics

    def refresh(self, state: RefreshState, round_: int) -> tuple[RefreshState, dict]:
        """One round (module docstring): new gold-labelled pairs into the buffer, then
        ``refresh_steps`` reward-model steps alternating new (buffer) and old (human) batches."""
        run = self.run
        tokens, masks, metrics = self._new_pairs(state, round_)
        buf_t, buf_m = np.array(state.pairs_tokens), np.array(state.pairs_mask)
        n = int(jax.device_get(state.num_pairs))
        buf_t[n:n + len(tokens)], buf_m[n:n + len(tokens)] = tokens, masks
        n += len(tokens)
        human = run.batches(run.preference_dataset("preferences", 2), dataclasses.replace(
            run.batch_config(self.rm_batch, seed_offset=2, num_candidates=2),
            seed=run.cfg.seed + 6151 * (round_ + 1)))
        rng = np.random.default_rng([run.cfg.seed, 37, round_])
        rm_state, losses = state.rm, []
        with jax.set_mesh(run.mesh):
            for s in range(self.steps):
                if s % 2 == 0:
                    pick = rng.integers(0, n, self.rm_batch)
                    batch = preference_batch(buf_t[pick], buf_m[pick])
                else:
                    batch = next(human)
                rm_state, m = self.rm_step(rm_state, run.place(batch))
                losses.append(m["rm/loss"])  # (sum, count) on device: read once, below
        per_step = [float(t) / max(float(c), 1.0) for t, c in jax.device_get(losses)]
        metrics.update({"refresh/rm_loss": float(np.mean(per_step)), "refresh/pairs": float(n)})
        state = state.replace(rm=rm_state, pairs_tokens=buf_t, pairs_mask=buf_m,
                              num_pairs=np.asarray(n, np.int32))
        return state, metrics

    def wrap(self, step_fn):
        """``step_fn(ppo_state, batch, ref, reward_params) -> (ppo_state, metrics)`` as the
        loop's ``(RefreshState, batch, ref, _) -> (RefreshState, metrics)``: a refresh round
        when due, then the RL iteration against the current reward model."""
        def step(state: RefreshState, batch, ref, _unused):
            it = int(jax.device_get(state.iteration))
            extra = {}
            if self.due(it):
                state, extra = self.refresh(state, it // self.every)
            ppo_state, metrics = step_fn(state.ppo, batch, ref, state.rm.params)
            state = state.replace(ppo=ppo_state, iteration=np.asarray(it + 1, np.int32))
            return state, {**metrics, **{k: (v, 1.0) for k, v in extra.items()}}
        return step


def refresh_params(state) -> Params | None:
    """The current reward-model parameters of a loop state (``None`` for a plain
    ``PPOState``)."""
    return state.rm.params if isinstance(state, RefreshState) else None
