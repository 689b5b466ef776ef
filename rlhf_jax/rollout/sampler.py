"""Autoregressive sampling with a KV cache: one prefill, then one token per loop step.

The sampler runs the *same* ``Model.apply`` as the training forward, with a ``KVCache``: the
prompt is prefilled in one call, then each new token is fed at its own cache slot inside a
``jax.lax.while_loop`` (static shapes, no Python loop over tokens, one compile per
``(B, P, R)`` bucket). Because cached attention over slots ``<= t`` is the same computation as
causal attention over tokens ``<= t``, rollout log-probs equal training log-probs up to float
rounding (tests hold that to 1e-5 in float32, and to 1e-3 at a bfloat16 ``SamplingConfig.dtype``
against the training forward at bfloat16).

Layout of a sampled batch (``P`` prompt slots, ``R = max_new_tokens``)::

    slot      0 .. P-1                      P .. P+R-1
    tokens    [pad .. pad, prompt tokens]   [y_0, y_1, .., EOS, pad .. pad]
    mask      [F   .. F,   T .. T       ]   [T,   T,   .., T,   F   .. F  ]
    position  [0   .. 0,   0 .. n-1     ]   [n,   n+1, .., ...           ]

with ``n`` the number of real prompt tokens of the row (``types.positions_from_mask`` of the
full mask gives exactly these positions for the real tokens).

Typical use::

    cfg = SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.9,
                         eos_token_id=2, pad_token_id=0)
    sampler = make_sampler(model, cfg)               # jitted, model and cfg static
    out = sampler(params, prompt.tokens, prompt.attn_mask, rng)
    out.tokens, out.attn_mask, out.positions         # [B, P+R] for the training forward
    out.logprobs                                     # [B, R] log pi(y_r | x, y_<r) at temperature

or ``jax.jit(sample, static_argnames=("model", "cfg"))`` inside a larger jitted phase.

Each token is drawn by ``rlhf_jax.rollout.filters.select_tokens`` (``suppress_eos``, temperature,
top-k, top-p); those filters are importable from here too.

Decode-step cost (one token per row per step is a matrix-vector product per weight matrix, so
a step is bound by reading the weights once): the sampler casts the parameters to
``SamplingConfig.dtype`` once per call; the prefill runs the stacked blocks under the layer
scan; then, with ``unroll_layers``, the blocks and the cache are split into per-layer trees
and buffers *once*, outside the decode loop, whose step runs the blocks unrolled, each
updating its own ``[B, H_kv, S, K]`` cache buffer in place. Found in the compiled HLO on
XLA:CPU (``bench/README.md``, "Sampler"): slicing a layer out of the stacked weights inside
the loop materialised a copy of every layer's weights at every step, and the former
``[B, S, H_kv, K]`` cache layout a transposed copy of every layer's cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rlhf_jax.data.batching import choose_bucket
from rlhf_jax.losses.kl import kl_estimate
from rlhf_jax.models.model import Model, Params
from rlhf_jax.rollout.filters import select_tokens, suppress_eos, top_k_mask, top_p_mask
from rlhf_jax.types import positions_from_mask


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the sampler draws tokens and when it stops (static: part of the jit cache key).

    Order of operations on the next-token logits (as in HF transformers' logits warpers):
    divide by ``temperature``, keep the ``top_k`` largest, keep the nucleus of mass
    ``top_p``, sample. ``greedy`` takes the argmax of the raw logits instead.

    Attributes:
      max_new_tokens: ``R``, the number of response slots (tokens generated per row at most).
      temperature: softmax temperature ``tau > 0``; tokens are drawn from
        ``softmax(logits / tau)`` (after top-k/top-p filtering). Also defines the distribution
        whose log-probs are reported (``SampleOutput.logprobs``), even when ``greedy``.
      top_k: keep only the ``k`` highest logits before sampling (Fan et al. 2018); ``0``
        disables. Ties with the k-th logit are kept. Values ``>= V`` are a no-op.
      top_p: nucleus sampling (Holtzman et al. 2020, Sec. 3.1): keep the smallest set of most
        likely tokens whose probability mass reaches ``top_p`` (the most likely token is always
        kept); ``1.0`` disables. Ties with the last kept logit are kept.
      greedy: take ``argmax(logits)`` instead of sampling (temperature/top-k/top-p only affect
        the reported log-probs, through ``temperature``).
      eos_token_id: one id or a tuple of ids that end a response (e.g. ``<|im_end|>`` and
        ``<|endoftext|>``). The first one emitted is part of the response (its mask is True);
        every later slot gets ``pad_token_id`` and mask False.
      pad_token_id: id written into response slots after EOS (masked out; may equal an EOS id).
        Both ids may be left ``None`` in a configuration and filled from a tokenizer with
        ``with_token_ids`` (the pipeline does; an explicit id is kept); sampling with a
        ``None`` id raises.
      stop_early: leave the decode loop as soon as every row has emitted EOS (a
        ``while_loop`` with a data-dependent trip count). ``False`` always runs ``R`` steps;
        the outputs are identical either way (per-step keys are ``fold_in(rng, step)``).
      min_new_tokens: EOS ids cannot be drawn in response slots ``r < min_new_tokens`` (their
        logits are ``-inf`` there, as HF's ``MinNewTokensLengthLogitsProcessor``). The
        constraint is part of the policy: reported log-probs are under the constrained
        distribution, and the PPO training forward applies the same ``suppress_eos``, so
        sampler and training log-probs still agree. ``min_new_tokens == max_new_tokens``
        gives fixed-length responses, the setting of Ziegler et al. 2019 (§3.1, 24-token
        continuations), which leaves a policy no way to game a reward model through length.
        ``0`` (default) disables.
      dtype: compute dtype of the sampling forward: ``None`` (default) keeps the model's
        ``cfg.dtype``; ``"bfloat16"`` / ``"float32"`` cast the floating parameters to it once
        per ``sample`` call and run the model with that compute dtype (the caller's
        parameters, e.g. a trainer's float32 masters, are not changed). Reported log-probs
        are then those of the model at this dtype: ``rollout_model`` / ``cast_params`` give
        the training forward at the same dtype, and ``logprob_mismatch`` measures the gap to
        the training dtype. bfloat16 halves the bytes a decode step reads (the bound on an
        accelerator); on XLA:CPU its matmuls were slower than float32 here (``bench/README.md``).
      unroll_layers: run the decode step with per-layer parameters and a per-layer cache
        (the blocks unrolled; ``Model.apply`` with ``params["trunk"]["blocks"]`` a tuple)
        instead of one ``lax.scan`` over the stacked blocks. ``None`` / False (default):
        scanned. True is faster wherever measured (``bench/README.md``): 1.2 to 1.4x per
        decode step on XLA:CPU, where slicing a layer out of the stacked weights inside the
        decode loop copies it at every step, and 2x on an H200 (1B Llama, bfloat16, batch
        64). It is opt-in because under FSDP it keeps every layer's gathered weights alive for
        the whole decode (``rlhf-jax plan`` samples scanned), and because a different float
        accumulation order would change the sampled streams of runs already recorded; turn
        it on for a model that fits one device. The split costs one copy of the block weights
        per call (in ``dtype``, alive during the decode loop) and a decode step compiled per
        layer.
        Same outputs either way up to float32 accumulation order.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    stop_early: bool = True
    min_new_tokens: int = 0
    dtype: str | None = None
    unroll_layers: bool | None = None

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingConfig.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"SamplingConfig.min_new_tokens must be an int in [0, max_new_tokens"
                             f" = {self.max_new_tokens}], got {self.min_new_tokens!r}")
        if (not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool)
                or not math.isfinite(self.temperature) or self.temperature <= 0):
            raise ValueError(
                f"SamplingConfig.temperature must be a finite float > 0, got {self.temperature!r} "
                "(use greedy=True for argmax decoding)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an int >= 0 (0 disables), "
                             f"got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1 disables), "
                             f"got {self.top_p!r}")
        if not isinstance(self.greedy, bool) or not isinstance(self.stop_early, bool):
            raise ValueError(f"SamplingConfig.greedy and stop_early must be bools, got "
                             f"greedy={self.greedy!r}, stop_early={self.stop_early!r}")
        eos = self.eos_token_id
        if eos is None:
            pass
        elif _is_int(eos) and eos >= 0:
            object.__setattr__(self, "eos_token_id", int(eos))
        elif (isinstance(eos, (list, tuple)) and eos
              and all(_is_int(e) and e >= 0 for e in eos)):
            object.__setattr__(self, "eos_token_id", tuple(int(e) for e in eos))  # hashable
        else:
            raise ValueError(f"SamplingConfig.eos_token_id must be a non-negative int or a "
                             f"non-empty tuple of them, got {eos!r}")
        if self.pad_token_id is not None and (not _is_int(self.pad_token_id)
                                              or self.pad_token_id < 0):
            raise ValueError(f"SamplingConfig.pad_token_id must be an int >= 0, "
                             f"got {self.pad_token_id!r}")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"SamplingConfig.dtype must be None, 'float32' or 'bfloat16', "
                             f"got {self.dtype!r}")
        if not (self.unroll_layers is None or isinstance(self.unroll_layers, bool)):
            raise ValueError(f"SamplingConfig.unroll_layers must be None or a bool, "
                             f"got {self.unroll_layers!r}")

    def with_token_ids(self, eos_token_id, pad_token_id) -> "SamplingConfig":
        """This config with the ids that are ``None`` set to the given ones (a tokenizer's);
        ids set explicitly are kept."""
        return dataclasses.replace(
            self, eos_token_id=eos_token_id if self.eos_token_id is None else self.eos_token_id,
            pad_token_id=pad_token_id if self.pad_token_id is None else self.pad_token_id)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple.

        Raises:
          ValueError: the EOS or pad id is unset (``None``): call ``with_token_ids`` first.
        """
        if self.eos_token_id is None or self.pad_token_id is None:
            raise ValueError("SamplingConfig.eos_token_id / pad_token_id are unset (None): fill "
                             "them from the tokenizer with SamplingConfig.with_token_ids(eos, pad)")
        e = self.eos_token_id
        return (e,) if isinstance(e, int) else e

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` if an EOS or the pad id is outside ``[0, vocab_size)``."""
        for name, ids in (("eos_token_id", self.eos_ids), ("pad_token_id", (self.pad_token_id,))):
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise ValueError(f"SamplingConfig.{name} {bad} is outside the model's vocabulary "
                                 f"of {vocab_size} ids")


@struct.dataclass
class SampleOutput:
    """Sampled responses, their masks and log-probs, plus the prompts they continue.

    Attributes:
      response: ``[B, R] int32`` sampled ids; ``pad_token_id`` after the first EOS.
      response_mask: ``[B, R] bool`` True up to and including the first EOS (all R if none).
      logprobs: ``[B, R] float32`` nats, ``logprobs[b, r] = log softmax(z_r / tau)[y_r]`` with
        ``z_r`` the model's logits given ``(x, y_<r)`` and ``tau`` the config temperature:
        the *unfiltered* tempered distribution, i.e. what the training forward computes at the
        same temperature (as in lm-human-preferences, Ziegler et al. 2019, and TRL's PPO),
        not the top-k/top-p truncated one that the token was actually drawn from. 0 where
        masked.
      ended: ``[B] bool`` the row emitted an EOS within R tokens (rows that did not are
        truncated; PPO setups often penalise them).
      lengths: ``[B] int32`` number of response tokens, EOS included (= ``response_mask.sum(-1)``).
      prompt_tokens: ``[B, P] int32`` the left-padded prompts that were continued.
      prompt_mask: ``[B, P] bool``.
      num_steps: scalar int32, response slots the decode loop filled before stopping (``<= R``;
        ``< R`` only when every row ended early and ``stop_early``).
    """

    response: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    ended: jax.Array
    lengths: jax.Array
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    num_steps: jax.Array

    @property
    def tokens(self) -> jax.Array:
        """``[B, P+R] int32`` prompt (left-padded) followed by the response."""
        return jnp.concatenate([self.prompt_tokens, self.response], axis=-1)

    @property
    def attn_mask(self) -> jax.Array:
        """``[B, P+R] bool`` True on real prompt tokens and on response tokens up to EOS."""
        return jnp.concatenate([self.prompt_mask, self.response_mask], axis=-1)

    @property
    def positions(self) -> jax.Array:
        """``[B, P+R] int32`` ``positions_from_mask(attn_mask)``: the positions the sampler used."""
        return positions_from_mask(self.attn_mask)

    @property
    def loss_mask(self) -> jax.Array:
        """``[B, P+R] bool`` True on response tokens (EOS included), aligned with ``tokens``."""
        return jnp.concatenate([jnp.zeros_like(self.prompt_mask), self.response_mask], axis=-1)

    @property
    def prompt_len(self) -> int:
        """``P`` (static)."""
        return self.prompt_tokens.shape[-1]


def is_eos(tokens: jax.Array, eos_token_id: int | tuple[int, ...]) -> jax.Array:
    """``tokens == eos`` for one id or any of a tuple of ids (same shape, bool)."""
    ids = (eos_token_id,) if _is_int(eos_token_id) else tuple(eos_token_id)
    out = jnp.zeros(tokens.shape, bool)
    for i in ids:
        out = out | (tokens == int(i))
    return out


# ---- the sampling forward: dtype and per-layer parameters -------------------------------------

def rollout_model(model: Model, dtype: str | None) -> Model:
    """``model`` with compute dtype ``dtype`` (``None``: ``model`` itself): the model the
    sampler runs for ``SamplingConfig.dtype``. Its training forward (``Model.apply`` on
    ``cast_params(params, dtype)``) is the computation the sampler's log-probs equal."""
    if dtype is None or dtype == model.cfg.dtype:
        return model
    return Model(dataclasses.replace(model.cfg, dtype=dtype), model.kind)


def cast_params(params: Params, dtype: str | None) -> Params:
    """Floating leaves of ``params`` cast to ``dtype`` (``None``, or leaves already in it:
    unchanged, no copy); integer leaves (e.g. quantised kernels) are kept."""
    if dtype is None:
        return params
    dt = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def per_layer_params(params: Params, n_layers: int) -> Params:
    """``params`` with ``trunk.blocks`` (each leaf ``[L, ...]``) split into a tuple of ``L``
    per-layer trees (leaves ``[...]``), the form ``Model.apply`` runs as an unrolled layer
    loop. One copy of the block weights; meant to be done once, outside a decode loop."""
    blocks = params["trunk"]["blocks"]
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(n_layers))
    return {**params, "trunk": {**params["trunk"], "blocks": layers}}


def _unroll(cfg: SamplingConfig) -> bool:
    return bool(cfg.unroll_layers)


def logprob_mismatch(sampler_logprobs: jax.Array, train_logprobs: jax.Array,
                     mask: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """How far the sampler's log-probs are from the training forward's on the same tokens
    (a sampling dtype other than the training dtype, e.g. bfloat16 vs float32 masters, or
    any other numerical difference between the two paths), as ``(sum, count)`` metrics over
    the response tokens:

    * ``rollout/logprob_mismatch``: token mean of ``|logp_sampler - logp_train|`` (nats);
    * ``rollout/logprob_mismatch_k3``: token mean of the k3 estimator
      ``exp(-d) - 1 + d``, ``d = logp_sampler - logp_train``, an unbiased, non-negative
      estimate of ``KL(pi_sampler || pi_train)`` per token from the sampler's own draws
      (``rlhf_jax.losses.kl.kl_estimate``; Schulman 2020, "Approximating KL divergence").

    Args:
      sampler_logprobs: ``[B, R] float32`` ``SampleOutput.logprobs``.
      train_logprobs: ``[B, R] float32`` the training forward's log-probs of the same
        responses at the same temperature (e.g. PPO's rollout log-probs).
      mask: ``[B, R] bool`` the response tokens (``SampleOutput.response_mask``).

    Returns:
      ``{name: (sum, count)}`` float32 scalars (count = number of response tokens).
    """
    m = mask.astype(jnp.float32)
    s, t = sampler_logprobs.astype(jnp.float32), train_logprobs.astype(jnp.float32)
    d = jnp.where(mask, s - t, 0.0)
    k3 = kl_estimate(d, jnp.zeros_like(d), "k3")
    n = jnp.sum(m)
    return {"rollout/logprob_mismatch": (jnp.sum(jnp.abs(d) * m), n),
            "rollout/logprob_mismatch_k3": (jnp.sum(k3 * m), n)}


# ---- the sampler ----------------------------------------------------------------------------

def _check_inputs(model: Model, prompt_tokens, prompt_mask, rng, cfg: SamplingConfig) -> None:
    if not isinstance(cfg, SamplingConfig):
        raise TypeError(f"cfg must be a SamplingConfig, got {type(cfg).__name__}")
    if model.kind == "scalar":
        raise ValueError("sample() needs a model with an LM head (kind 'lm' or 'lm_value'), "
                         "got kind 'scalar'")
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(f"prompt_tokens must be [B, P] and prompt_mask the same shape; got "
                         f"{prompt_tokens.shape} and {prompt_mask.shape}")
    if prompt_tokens.shape[1] < 1:
        raise ValueError("prompt_tokens has P = 0 columns; every row needs at least one token")
    if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be integer ids, got dtype {prompt_tokens.dtype}")
    if not jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
        raise TypeError(f"rng must be a typed key (jax.random.key), got dtype "
                        f"{jnp.asarray(rng).dtype}")
    cfg.check_vocab(model.cfg.vocab_size)


def sample(model: Model, params: Params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
           rng: jax.Array, cfg: SamplingConfig, num_samples: int = 1) -> SampleOutput:
    """Continue left-padded prompts by up to ``R = cfg.max_new_tokens`` tokens each.

    ``y_r ~ filter(softmax(f(x, y_<r) / tau))`` for ``r = 0 .. R-1``, stopping a row after its
    first EOS. Pure: call under ``jax.jit`` with ``model`` and ``cfg`` static
    (``jax.jit(sample, static_argnames=("model", "cfg"))``, or ``make_sampler``); compiles once
    per ``(B, P, R)``.

    Algorithm: one ``model.apply`` prefills the prompt into a cache of ``P + R - 1`` slots
    (slot ``P + r`` holds response token ``r``; the last token is never fed back) and gives
    the logits of ``y_0``; a ``lax.while_loop`` then feeds ``y_{r-1}`` at ``cache_index =
    P + r - 1`` with position ``n + r - 1`` (``n`` = real prompt tokens of the row, i.e.
    ``positions_from_mask`` of the full sequence) and draws ``y_r``. Step ``r`` uses the key
    ``fold_in(rng, r)``. Response slots after a row's EOS are fed as padding (masked in the
    cache) and hold ``pad_token_id``.

    The model runs at ``cfg.dtype`` (``rollout_model``, ``cast_params``: one cast per call)
    and, with ``cfg.unroll_layers``, on per-layer parameters and a per-layer cache
    (``per_layer_params``; see the module docstring for why).

    With ``num_samples = k > 1`` each prompt is prefilled once and its cache (and first-token
    logits) repeated ``k`` times: rows ``g k .. g k + k - 1`` of the output continue prompt
    ``g``, each with its own noise (the draw of step ``r`` is over all ``B k`` rows). The
    prefill, the larger part of the work for short responses, costs ``B`` rows, not ``B k``.

    Args:
      model: an ``lm`` or ``lm_value`` ``Model`` (static).
      params: its parameters.
      prompt_tokens: ``[B, P] int32`` prompts, LEFT-padded (``PromptBatch.tokens``).
      prompt_mask: ``[B, P] bool`` True on real tokens; each row must have at least one real
        token and its last column must be real (left padding). Not checked under jit: see
        ``check_prompt_mask``.
      rng: typed PRNG key (``jax.random.key``).
      cfg: ``SamplingConfig`` (static).
      num_samples: ``k``, responses per prompt (static).

    Returns:
      ``SampleOutput`` of ``B k`` rows (``response``, ``response_mask``, ``logprobs``,
      ``ended``, ``lengths`` all ``[B k, R]`` / ``[B k]``; ``prompt_tokens`` / ``prompt_mask``
      the prompts repeated; ``tokens`` / ``attn_mask`` / ``positions`` ``[B k, P+R]``).

    Raises:
      ValueError: bad shapes, a scalar model, EOS/pad ids unset or outside the vocabulary, or a cache
        longer than GPT-2's ``max_positions``.
      TypeError: ``rng`` is a raw ``uint32`` key, or ``cfg`` is not a ``SamplingConfig``.
    """
    prompt_tokens = jnp.asarray(prompt_tokens)
    prompt_mask = jnp.asarray(prompt_mask)
    _check_inputs(model, prompt_tokens, prompt_mask, rng, cfg)
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(bool)
    b, p = prompt_tokens.shape
    r_max = cfg.max_new_tokens

    # The sampling forward: cast once (outside the decode loop).
    model = rollout_model(model, cfg.dtype)
    params = cast_params(params, cfg.dtype)
    unrolled = _unroll(cfg)

    # Prefill: slots 0..P-1, the stacked blocks under the layer scan (one compiled block: the
    # prefill reads each weight once whatever the form). Only the last column's logits are
    # needed (left padding).
    cache = model.init_cache(b, p + r_max - 1)
    prompt_pos = positions_from_mask(prompt_mask)
    out = model.apply(params, prompt_tokens, prompt_pos, prompt_mask, cache=cache, cache_index=0,
                      compute_logits=False)
    logits0 = model.logits(params, out.hidden[:, -1])  # [B, V]
    n_prompt = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)  # [B]
    cache = out.cache
    if unrolled:  # the decode loop's form: split the blocks and the cache once
        params = per_layer_params(params, model.cfg.n_layers)
        cache = cache.unstacked()
    if num_samples > 1:  # share the prefill: repeat each row's cache k times
        def rep(x, axis=0):
            return jnp.repeat(x, num_samples, axis=axis)
        b_axis = 0 if unrolled else 1  # per-layer [B, H, S, K] or stacked [L, B, H, S, K]
        cache = cache.replace(k=jax.tree.map(lambda x: rep(x, b_axis), cache.k),
                              v=jax.tree.map(lambda x: rep(x, b_axis), cache.v),
                              valid=rep(cache.valid))
        logits0, n_prompt = rep(logits0), rep(n_prompt)
        prompt_tokens, prompt_mask = rep(prompt_tokens), rep(prompt_mask)
        b *= num_samples

    def pick(step, logits, done):
        tok, logp = select_tokens(logits, jax.random.fold_in(rng, step), cfg, step)
        active = ~done
        tok = jnp.where(active, tok, cfg.pad_token_id)
        logp = jnp.where(active, logp, 0.0)
        return tok, logp, active, done | (active & is_eos(tok, cfg.eos_token_id))

    response = jnp.full((b, r_max), cfg.pad_token_id, jnp.int32)
    response_mask = jnp.zeros((b, r_max), bool)
    logprobs = jnp.zeros((b, r_max), jnp.float32)
    tok0, lp0, m0, done0 = pick(0, logits0, jnp.zeros((b,), bool))
    response = response.at[:, 0].set(tok0)
    response_mask = response_mask.at[:, 0].set(m0)
    logprobs = logprobs.at[:, 0].set(lp0)

    def cond(carry):
        step, _, _, _, _, done = carry
        keep_going = step < r_max
        if cfg.stop_early:
            keep_going = keep_going & ~jnp.all(done)
        return keep_going

    def body(carry):
        step, cache, response, response_mask, logprobs, done = carry
        prev = step - 1
        prev_tok = jax.lax.dynamic_slice_in_dim(response, prev, 1, axis=1)       # [B, 1]
        prev_mask = jax.lax.dynamic_slice_in_dim(response_mask, prev, 1, axis=1)  # [B, 1]
        pos = (n_prompt + prev)[:, None]
        out = model.apply(params, prev_tok, pos, prev_mask, cache=cache, cache_index=p + prev,
                          compute_logits=False)
        logits = model.logits(params, out.hidden[:, 0])
        tok, logp, active, done = pick(step, logits, done)
        response = jax.lax.dynamic_update_slice_in_dim(response, tok[:, None], step, axis=1)
        response_mask = jax.lax.dynamic_update_slice_in_dim(response_mask, active[:, None], step,
                                                            axis=1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, logp[:, None], step, axis=1)
        return step + 1, out.cache, response, response_mask, logprobs, done

    carry = (jnp.int32(1), cache, response, response_mask, logprobs, done0)
    steps, _, response, response_mask, logprobs, done = jax.lax.while_loop(cond, body, carry)
    return SampleOutput(response=response, response_mask=response_mask, logprobs=logprobs,
                        ended=done, lengths=jnp.sum(response_mask, axis=-1, dtype=jnp.int32),
                        prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, num_steps=steps)


def check_prompt_mask(prompt_mask) -> None:
    """Host-side check that a ``[B, P]`` prompt mask is left-padded with >= 1 real token per row.

    Raises:
      ValueError: naming the first offending row (all padding, or padding after a real token).
    """
    m = np.asarray(prompt_mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"prompt_mask must be [B, P], got shape {m.shape}")
    empty = np.flatnonzero(~m.any(-1))
    if empty.size:
        raise ValueError(f"prompt row {int(empty[0])} has no real token (every row needs >= 1, "
                         "e.g. a BOS)")
    # left-padded <=> once True, stays True
    bad = np.flatnonzero((np.diff(m.astype(np.int8), axis=-1) < 0).any(-1))
    if bad.size:
        raise ValueError(f"prompt row {int(bad[0])} is not left-padded: it has padding after a "
                         "real token (the sampler continues from the last column)")


def pad_prompts_to_bucket(prompt_tokens: jax.Array, prompt_mask: jax.Array,
                          buckets: Sequence[int], pad_token_id: int
                          ) -> tuple[jax.Array, jax.Array]:
    """Left-pad ``[B, P]`` prompts to ``[B, P']``, ``P'`` the smallest bucket ``>= P``
    (``rlhf_jax.data.batching.choose_bucket``), so a jitted sampler compiles once per bucket
    rather than once per prompt width. New columns hold ``pad_token_id`` with mask False;
    the continuation is the same (positions come from the mask, padded slots are never
    attended to).

    Args:
      prompt_tokens: ``[B, P]`` int, left-padded.
      prompt_mask: ``[B, P]`` bool.
      buckets: increasing prompt widths.
      pad_token_id: id written into the new columns.

    Returns:
      ``(tokens [B, P'] int32, mask [B, P'] bool)`` (the inputs unchanged when ``P`` is a
      bucket).

    Raises:
      ValueError: ``P`` exceeds the largest bucket (names both numbers).
    """
    p = prompt_tokens.shape[-1]
    width = choose_bucket(p, buckets)
    if width == p:
        return prompt_tokens, prompt_mask
    pad = ((0, 0), (width - p, 0))
    return (jnp.pad(jnp.asarray(prompt_tokens, jnp.int32), pad, constant_values=pad_token_id),
            jnp.pad(jnp.asarray(prompt_mask, bool), pad, constant_values=False))


def make_sampler(model: Model, cfg: SamplingConfig, *, validate: bool = True,
                 num_samples: int = 1, prompt_buckets: Sequence[int] | None = None
                 ) -> Callable[[Params, jax.Array, jax.Array, jax.Array], SampleOutput]:
    """``sample`` jitted with ``model`` and ``cfg`` bound (one compile per ``(B, P)`` shape,
    or per ``(B, bucket)`` with ``prompt_buckets``).

    Args:
      model: an ``lm`` / ``lm_value`` ``Model``.
      cfg: the ``SamplingConfig``.
      num_samples: responses per prompt (``sample``'s ``num_samples``: one shared prefill).
      validate: run ``check_prompt_mask`` on the host before each call when the mask is a
        concrete, fully addressable array (a small device-to-host copy).
      prompt_buckets: increasing prompt widths: each call's prompts are first left-padded to
        the smallest bucket that fits (``pad_prompts_to_bucket``), so prompts of any width
        up to the largest bucket compile ``len(prompt_buckets)`` times at most (per batch
        size). The output's prompt columns are then the bucket's. ``None``: no padding.

    Returns:
      ``fn(params, prompt_tokens [B,P], prompt_mask [B,P], rng) -> SampleOutput``.

    Raises:
      ValueError / TypeError: as ``SamplingConfig``, ``sample``, ``check_prompt_mask`` and
        ``pad_prompts_to_bucket``; unsorted or non-positive ``prompt_buckets``.
    """
    if not isinstance(cfg, SamplingConfig):
        raise TypeError(f"cfg must be a SamplingConfig, got {type(cfg).__name__}")
    cfg.check_vocab(model.cfg.vocab_size)
    if prompt_buckets is not None:
        prompt_buckets = tuple(int(b) for b in prompt_buckets)
        if not prompt_buckets or prompt_buckets[0] < 1 or list(prompt_buckets) != sorted(
                set(prompt_buckets)):
            raise ValueError(f"prompt_buckets must be increasing positive widths, got "
                             f"{prompt_buckets}")

    @jax.jit
    def jitted(params, prompt_tokens, prompt_mask, rng):
        return sample(model, params, prompt_tokens, prompt_mask, rng, cfg, num_samples)

    def sampler(params, prompt_tokens, prompt_mask, rng):
        if validate and not isinstance(prompt_mask, jax.core.Tracer) and getattr(
                prompt_mask, "is_fully_addressable", True):
            check_prompt_mask(prompt_mask)
        if prompt_buckets is not None:
            prompt_tokens, prompt_mask = pad_prompts_to_bucket(
                prompt_tokens, prompt_mask, prompt_buckets, cfg.pad_token_id)
        return jitted(params, prompt_tokens, prompt_mask, rng)

    sampler.jitted = jitted  # exposed for trace/lowering inspection
    return sampler


__all__ = ["SampleOutput", "SamplingConfig", "cast_params", "check_prompt_mask", "is_eos",
           "logprob_mismatch", "make_sampler", "pad_prompts_to_bucket", "per_layer_params",
           "rollout_model", "sample",
           "select_tokens", "suppress_eos", "top_k_mask", "top_p_mask"]
