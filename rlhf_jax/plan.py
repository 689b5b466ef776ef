"""Memory planning: per-device bytes of every stage's jitted step on a mesh, before renting it.

``make_plan(cfg)`` builds each requested stage's model, optimizer, shardings and jitted step
with the trainers' own builders (``make_sft_step``, ``make_reward_step``, ``make_dpo_step``,
``make_ppo_iteration``, ``make_optimizer``, ``train_state_shardings``,
``Model.param_shardings``), feeds them abstract arguments (``jax.ShapeDtypeStruct`` with
their ``NamedSharding``; ``jax.eval_shape`` of the state's initialisation, so no weight is
ever allocated), then lowers and compiles the step for the mesh and reads XLA's memory
analysis of the compiled program. The command line is ``rlhf-jax plan`` (``rlhf_jax.cli``),
which compiles on fake CPU devices when the machine has fewer devices than the mesh.

Where each number comes from (all are bytes **per device**):

* **XLA** (``Compiled.memory_analysis()``): ``argument_bytes`` (the step's inputs: state,
  frozen models, batch; without the few arrays the step never reads, which ``jax.jit``
  leaves out of the program although the caller holds them, e.g. the reference policy's
  value head), ``output_bytes`` (new state, metrics), ``alias_bytes`` (outputs
  written into donated inputs: the state), ``temp_bytes`` (XLA's temporary buffers:
  activations, gradients, the sampler's KV cache, ...). ``total_bytes = argument_bytes +
  output_bytes - alias_bytes + temp_bytes`` is the plan's estimate of the peak.
* **Shard arithmetic** (``shard_bytes``: the per-device shard shape of each argument's
  sharding times its item size): the split of the arguments into ``params`` (trained
  parameters: the policy or reward model, and a separate value model; with LoRA only the
  adapters and the scalar head), ``optimizer_state`` (Adam's moments and counters),
  ``frozen`` (the reference policy and the reward model the step reads, and with LoRA the
  frozen base under the adapters) and ``inputs`` (the batch, RNG keys, step counters, KL
  state); and the PPO sampler's ``kv_cache``: keys and values ``[L, B k, P + R - 1, H_kv,
  K]`` in the compute dtype plus the ``[B k, P + R - 1]`` slot mask, assuming rows split
  over the batch axes (``data x fsdp x expert``) and KV heads over ``tensor`` as the
  activation rules ask (``rlhf_jax.sharding.ACTIVATION_RULES``). ``activation_bytes =
  temp_bytes - kv_cache``.

The numbers are those of the compiler that compiled the step: on fake CPU devices, XLA's
CPU compiler, whose fusion and buffer assignment differ from the TPU and GPU compilers';
arguments and outputs are exact (they are the shardings), temporaries are an estimate.

``largest_batch`` finds the largest batch whose total fits a memory size (``--hbm-gib``) by
compiling at a few batch sizes: the smallest batch the mesh allows, then the prediction of a
linear fit of total bytes against the batch through the measurements nearest the budget,
each prediction compiled to check it, within ``max_compiles`` compiles per stage.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import sharding
from rlhf_jax.config import LoraConfig, ModelConfig
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.train.dpo import DPOConfig
from rlhf_jax.train.ppo import PPOConfig
from rlhf_jax.train.reward import RewardConfig
from rlhf_jax.train.sft import SFTConfig
from rlhf_jax.train.state import OptimizerConfig

#: The stages the planner compiles, in pipeline order.
STAGES = ("sft", "rm", "dpo", "ppo")
GIB = 2 ** 30
#: Set in the environment of the re-executed planner (``fake_device_env``), so that it never
#: re-executes itself again.
CHILD_ENV = "RLHF_JAX_PLAN_CHILD"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanPolicyConfig:
    """The policy to plan for (the reward, value and reference models derive from it as in
    the pipeline).

    Attributes:
      path: a named architecture (``rlhf_jax.models.architectures``: ``llama3-8b``,
        ``llama3-70b``, ``llama3.2-1b``, ``qwen2.5-7b``, ``smollm2-135m``, ...) or an HF
        checkpoint directory / ``config.json`` (only the config is read).
      dtype: compute dtype of the matmuls (the pipeline's ``--policy.dtype``).
      param_dtype: storage dtype of every parameter (trained and frozen) and of Adam's
        moments.
      remat: rematerialise each block in the backward pass (``ModelConfig.remat``).
      frozen_layers: embeddings and lowest blocks kept frozen (the pipeline's
        ``--policy.frozen-layers``).
      reward_layers: blocks of the reward model's (and a separate value model's) trunk;
        ``None``: all (the pipeline's ``--policy.reward-layers``).
      reward_frozen_layers: frozen blocks of the reward trunk.
      lora: LoRA as the pipeline's ``--policy.lora.*`` (``--policy.lora.rank 16``): adapters
        on the policy, reward and value models, only they (and a scalar head) train and have
        optimizer state; the reference of DPO and PPO is the policy's base (no copy). Off by
        default (no rank).
    """

    path: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False
    frozen_layers: int = 0
    reward_layers: int | None = None
    reward_frozen_layers: int = 0
    lora: LoraConfig = LoraConfig()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """What ``rlhf-jax plan`` compiles (every field is a command-line flag).

    Attributes:
      policy: the model (see ``PlanPolicyConfig``).
      mesh: the ``(data, fsdp, expert, tensor)`` mesh (``data=-1``: what the others leave
        of ``devices``).
      devices: devices of the mesh; ``None``: ``data x fsdp x expert x tensor`` with
        ``data=-1`` read as 1. A TPU v5p-64 or v4-32 slice names TensorCores: JAX sees one
        device per chip (2 TensorCores in megacore), so 32 and 16 devices.
      stages: stages to compile, of ``sft``, ``rm``, ``dpo``, ``ppo``.
      seq_len: ``T`` tokens of an SFT sequence and of each candidate of an RM / DPO
        comparison.
      prompt_len: ``P`` prompt tokens of a PPO rollout; the response length ``R`` is
        ``ppo.sampling.max_new_tokens``.
      batch_size: global batch of every stage: SFT sequences, RM / DPO comparisons (2
        candidates each), PPO prompts (``ppo.num_samples`` responses each). It must divide
        by the stage's batch unit (``batch_unit``). ``None``: each stage's unit (one row per
        batch shard).
      hbm_gib: device memory in GiB (95 for a TPU v5p chip, 32 for v4, 16 for v5e, 80 for an
        H100): mark what fits and search each stage's largest batch that fits.
      max_compiles: compiles per stage for that search (at least 2).
      json: print JSON instead of the table.
      optimizer: the optimizer of every trained model (AdamW: its state is the same for any
        learning-rate schedule).
      sft, rm, dpo, ppo: the step options of each stage, as in the pipeline's
        ``--sft.step.*``, ``--rm.step.*``, ``--dpo.dpo.*`` and ``--ppo.ppo.*`` (micro-batches,
        DPO loss type, PPO samples per prompt, minibatches, value model, KL penalty, ...).

    Raises:
      ValueError: an unknown stage, a non-positive length or batch, ``max_compiles < 2``.
    """

    policy: PlanPolicyConfig = PlanPolicyConfig()
    mesh: sharding.MeshConfig = sharding.MeshConfig()
    devices: int | None = None
    stages: tuple[str, ...] = STAGES
    seq_len: int = 1024
    prompt_len: int = 512
    batch_size: int | None = None
    hbm_gib: float | None = None
    max_compiles: int = 5
    json: bool = False
    optimizer: OptimizerConfig = OptimizerConfig()
    sft: SFTConfig = SFTConfig()
    rm: RewardConfig = RewardConfig()
    dpo: DPOConfig = DPOConfig()
    ppo: PPOConfig = PPOConfig(sampling=SamplingConfig(max_new_tokens=512, eos_token_id=0,
                                                       pad_token_id=0))

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ValueError(f"plan: stages {list(self.stages)} must be a non-empty subset of "
                             f"{', '.join(STAGES)}")
        for name in ("seq_len", "prompt_len", "batch_size", "devices"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"plan: {name} must be >= 1, got {v}")
        if self.hbm_gib is not None and not self.hbm_gib > 0:
            raise ValueError(f"plan: hbm_gib must be > 0, got {self.hbm_gib}")
        if self.max_compiles < 2:
            raise ValueError(f"plan: max_compiles must be >= 2, got {self.max_compiles}")
        if self.ppo.sampling.eos_token_id is None or self.ppo.sampling.pad_token_id is None:
            raise ValueError("plan: ppo.sampling needs eos_token_id and pad_token_id (any ids "
                             "in the vocabulary)")

    @property
    def num_devices(self) -> int:
        """Devices of the mesh: ``devices``, else the product of the mesh axes."""
        if self.devices is not None:
            return self.devices
        m = self.mesh
        return max(m.data, 1) * m.fsdp * m.expert * m.tensor


# ---- byte counting -----------------------------------------------------------------------
def _nbytes(count: int, dtype) -> int:
    """Bytes of ``count`` elements of ``dtype`` as XLA allocates them: a typed PRNG key counts
    its key data, and sub-byte types (``int4``) are packed (two per byte)."""
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
        return count * math.prod(data.shape) * data.dtype.itemsize
    dt = jnp.dtype(dtype)
    if jnp.issubdtype(dt, jnp.integer) or jnp.issubdtype(dt, jnp.floating):
        bits = (jnp.iinfo(dt) if jnp.issubdtype(dt, jnp.integer) else jnp.finfo(dt)).bits
        if bits < 8:
            return -(-count * bits // 8)
    return count * dt.itemsize


def shard_bytes(tree) -> int:
    """Bytes per device of a pytree of arrays or ``ShapeDtypeStruct`` s: for each leaf, the
    shard shape of its sharding (the whole shape without one) times its item size (a typed
    PRNG key counts its key data; ``int4`` packs two elements per byte). ``None`` leaves
    count 0."""
    total = 0
    for x in jax.tree.leaves(tree):
        s = getattr(x, "sharding", None)
        shape = s.shard_shape(x.shape) if s is not None else x.shape
        total += _nbytes(math.prod(shape), x.dtype)
    return total


def _hinted_shard_bytes(shape, dtype, logical_axes, mesh) -> int:
    """Per-device bytes of an activation ``shape`` under ``ACTIVATION_RULES`` (a dimension
    its mesh axes do not divide stays whole, as ``sharding.constrain`` leaves it)."""
    spec = sharding.logical_to_spec(logical_axes, sharding.ACTIVATION_RULES, mesh=mesh)
    per_device = []
    for size, axes in zip(shape, spec):
        n = 1 if axes is None else math.prod(
            mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        per_device.append(size // n if size % n == 0 else size)
    return _nbytes(math.prod(per_device), dtype)


def _abstract(tree, shardings):
    """``ShapeDtypeStruct`` s of ``tree``'s leaves carrying ``shardings`` (same structure)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


# ---- results -----------------------------------------------------------------------------
#: The split of a step's arguments (shard arithmetic), in display order.
ARGUMENT_GROUPS = ("params", "optimizer_state", "frozen", "inputs")


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One compiled step's memory, in bytes per device (module docstring: which numbers are
    XLA's and which are shard arithmetic).

    Attributes:
      stage: ``sft``, ``rm``, ``dpo`` or ``ppo``.
      batch_size: global batch (sequences, comparisons or prompts; ``PlanConfig.batch_size``).
      rows: sequences one step runs its forward on (comparisons x 2 candidates, prompts x
        samples per prompt).
      argument_bytes, output_bytes, alias_bytes, temp_bytes: XLA's memory analysis.
      split: shard arithmetic: ``params``, ``optimizer_state``, ``frozen``, ``inputs``
        (summing to the arguments the caller holds: XLA's ``argument_bytes`` plus any array
        the step never reads) and ``kv_cache`` (part of the temporaries).
      compile_seconds: wall time of lowering and compiling.
      warnings: sharding warnings raised while tracing (an activation whose dimension the
        mesh does not divide).
    """

    stage: str
    batch_size: int
    rows: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    split: dict[str, int]
    compile_seconds: float
    warnings: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        """Peak estimate: arguments + outputs - aliased outputs + temporaries (XLA)."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def activation_bytes(self) -> int:
        """Temporaries other than the KV cache (XLA's temporaries minus the arithmetic KV
        cache; the buffers of sampling and training share that space)."""
        return max(self.temp_bytes - self.split.get("kv_cache", 0), 0)


@dataclasses.dataclass(frozen=True)
class BatchFit:
    """The largest batch of one stage whose total fits ``budget_bytes``.

    Attributes:
      stage: the stage.
      budget_bytes: the memory size searched against (``PlanConfig.hbm_gib``).
      batch_size: the largest batch compiled that fits (a multiple of ``unit``); 0 when not
        even ``unit`` fits.
      total_bytes: its total per device (XLA); ``None`` when nothing fits.
      unit: the batch step (``batch_unit``).
      next_bytes: total per device of ``batch_size + unit`` (of ``unit`` when nothing fits):
        compiled, or predicted by the linear fit of ``largest_batch`` (``None``: the search
        stopped before it had one).
      next_measured: whether ``next_bytes`` was compiled.
      compiled: ``(batch, total_bytes)`` of every compile of the search.
    """

    stage: str
    budget_bytes: int
    batch_size: int
    total_bytes: int | None
    unit: int
    next_bytes: int | None
    next_measured: bool
    compiled: tuple[tuple[int, int], ...]

    @property
    def exact(self) -> bool:
        """Whether ``batch_size + unit`` was compiled and does not fit."""
        return self.next_measured and self.next_bytes > self.budget_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    """The result of ``make_plan``.

    Attributes:
      config: the ``PlanConfig``.
      model: the policy's ``ModelConfig``.
      mesh_shape: ``{"data": ..., "fsdp": ..., "expert": ..., "tensor": ...}``.
      platform: the devices' platform (``cpu`` for fake devices).
      stages: one ``StagePlan`` per requested stage, at the configured batch.
      fits: ``BatchFit`` per stage when ``hbm_gib`` is set.
    """

    config: PlanConfig
    model: ModelConfig
    mesh_shape: dict[str, int]
    platform: str
    stages: tuple[StagePlan, ...]
    fits: tuple[BatchFit, ...] = ()


# ---- building each stage's step with the trainers' own builders ----------------------------
@dataclasses.dataclass
class _Step:
    """A jitted step with abstract arguments, grouped for the split."""

    fn: Callable
    args: tuple
    groups: dict[str, Any]
    rows: int
    kv_cache_bytes: int = 0


def _reference_is_base(cfg) -> bool:
    """Whether a ``DPOConfig`` / ``PPOConfig`` takes its reference from the LoRA policy's own
    base (no reference argument), as the stages set it."""
    return bool(getattr(cfg, "reference_is_base", False))


def _rows_sharding(mesh) -> NamedSharding:
    """Every batch leaf's sharding: rows over the batch axes (as ``Run.batch_sharding``)."""
    return NamedSharding(mesh, PartitionSpec(sharding.DATA_AXES))


def _train_state(model, opt: OptimizerConfig, mesh):
    """``(tx, abstract TrainState, step shardings, array shardings)`` for ``model``, built as
    ``Run.train_state`` does (``make_optimizer`` with the model's frozen layers,
    ``train_state_shardings`` for the step), from ``jax.eval_shape`` of
    ``create_train_state``. The arrays carry every parameter's own sharding (``Run.train_state``
    places them with ``param_shardings``), also where the step's shardings leave one to the
    compiler (a LoRA model's frozen base)."""
    from rlhf_jax.train.state import create_train_state, make_optimizer, train_state_shardings

    params = model.abstract_params()
    param_shardings = model.param_shardings(mesh)
    tx = make_optimizer(opt, params, frozen_layers=model.cfg.frozen_layers)
    shardings = train_state_shardings(param_shardings, tx, params, mesh)
    state = jax.eval_shape(lambda p: create_train_state(p, tx, jax.random.key(0)), params)
    placed = shardings.replace(params=param_shardings)
    return tx, _abstract(state, placed), shardings, placed


def _frozen_params(model, mesh):
    """Abstract parameters of a frozen model in its shardings."""
    return _abstract(model.abstract_params(), model.param_shardings(mesh))


def _tokens(shape, rows, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=rows)


def _state_groups(state) -> dict[str, Any]:
    """A ``TrainState`` 's arguments by group; with LoRA its frozen base is ``frozen``."""
    from rlhf_jax.models.lora import has_adapters, partition

    if has_adapters(state.params):
        trained, base = partition(state.params)
    else:
        trained, base = state.params, None
    return {"params": trained, "frozen": base, "optimizer_state": state.opt_state,
            "inputs": (state.step, state.rng)}


def _merge_groups(*groups: dict) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in ARGUMENT_GROUPS}
    for g in groups:
        for k, v in g.items():
            out[k].append(v)
    return out


class _Builder:
    """Models and steps of every stage for one ``PlanConfig`` on one mesh."""

    def __init__(self, cfg: PlanConfig, mesh):
        from rlhf_jax.models.architectures import resolve_architecture
        from rlhf_jax.models.model import Model

        p = cfg.policy
        self.cfg, self.mesh = cfg, mesh
        self.model_cfg = resolve_architecture(
            p.path, dtype=p.dtype, param_dtype=p.param_dtype, remat=p.remat,
            frozen_layers=p.frozen_layers, lora=p.lora if p.lora.enabled else None)
        n_reward = p.reward_layers or self.model_cfg.n_layers
        if not 1 <= n_reward <= self.model_cfg.n_layers:
            raise ValueError(f"plan: policy.reward_layers={p.reward_layers} must be in "
                             f"[1, n_layers={self.model_cfg.n_layers}]")
        self.reward_cfg = dataclasses.replace(self.model_cfg, n_layers=n_reward,
                                              frozen_layers=p.reward_frozen_layers)
        self.Model = Model
        self.rows = _rows_sharding(mesh)
        self.dp = sharding.data_parallel_size(mesh)

    # Models are built here, outside any mesh context (a Model traces its init eagerly).
    def lm(self, kind="lm"):
        return self.Model(self.model_cfg, kind=kind)

    def reward(self):
        return self.Model(self.reward_cfg, kind="scalar")

    def build(self, stage: str, batch: int) -> _Step:
        return getattr(self, f"_{stage}")(batch)

    def _sft(self, b: int) -> _Step:
        from rlhf_jax.train.sft import make_sft_step
        from rlhf_jax.types import SFTBatch

        model = self.lm()
        tx, state, shardings, _ = _train_state(model, self.cfg.optimizer, self.mesh)
        t = self.cfg.seq_len
        batch = SFTBatch(tokens=_tokens((b, t), self.rows),
                         attn_mask=_tokens((b, t), self.rows, bool),
                         positions=_tokens((b, t), self.rows),
                         loss_mask=_tokens((b, t), self.rows, bool))
        step = make_sft_step(model, tx, self.cfg.sft, state_sharding=shardings,
                             batch_sharding=self.rows)
        return _Step(step, (state, batch), _merge_groups(_state_groups(state), {"inputs": batch}),
                     rows=b)

    def _pairs(self, b: int, t: int):
        from rlhf_jax.types import PreferenceBatch
        r = self.rows
        return PreferenceBatch(tokens=_tokens((b, 2, t), r), attn_mask=_tokens((b, 2, t), r, bool),
                               positions=_tokens((b, 2, t), r),
                               loss_mask=_tokens((b, 2, t), r, bool),
                               valid=_tokens((b, 2), r, bool))

    def _rm(self, b: int) -> _Step:
        from rlhf_jax.train.reward import make_reward_step

        model = self.reward()
        tx, state, shardings, _ = _train_state(model, self.cfg.optimizer, self.mesh)
        batch = self._pairs(b, self.cfg.seq_len)
        step = make_reward_step(model, tx, self.cfg.rm, state_sharding=shardings,
                                batch_sharding=self.rows)
        return _Step(step, (state, batch), _merge_groups(_state_groups(state), {"inputs": batch}),
                     rows=2 * b)

    def _dpo(self, b: int) -> _Step:
        from rlhf_jax.pipeline.stages import _share_frozen
        from rlhf_jax.train.dpo import make_dpo_step
        from rlhf_jax.types import UnpairedBatch

        model = self.lm()
        tx, state, shardings, _ = _train_state(model, self.cfg.optimizer, self.mesh)
        dpo_cfg = _share_frozen(self.cfg.dpo, model)  # as the DPO stage configures it
        ref = (_frozen_params(model, self.mesh) if dpo_cfg.needs_reference
               and not _reference_is_base(dpo_cfg) else None)
        t, r = self.cfg.seq_len, self.rows
        if dpo_cfg.unpaired:
            seq = lambda dt=jnp.int32: _tokens((b, t), r, dt)  # noqa: E731
            batch = UnpairedBatch(tokens=seq(), attn_mask=seq(bool), positions=seq(),
                                  loss_mask=seq(bool), label=_tokens((b,), r, bool),
                                  valid=_tokens((b,), r, bool), kl_tokens=seq(),
                                  kl_attn_mask=seq(bool), kl_positions=seq(),
                                  kl_loss_mask=seq(bool))
            rows = 2 * b  # the completions and their mismatched pairs
        else:
            batch, rows = self._pairs(b, t), 2 * b
        ref_sharding = None if ref is None else model.param_shardings(self.mesh)
        step = make_dpo_step(model, tx, dpo_cfg, state_sharding=shardings,
                             batch_sharding=self.rows, frozen_sharding=ref_sharding)
        return _Step(step, (state, batch, ref),
                     _merge_groups(_state_groups(state), {"inputs": batch, "frozen": ref}),
                     rows=rows)

    def _ppo(self, b: int) -> _Step:
        from rlhf_jax.pipeline.stages import _share_frozen
        from rlhf_jax.train.ppo import init_ppo_state, make_ppo_iteration, ppo_state_shardings

        c = self.cfg.ppo
        separate = c.needs_critic and c.value_model == "separate"
        policy = self.lm("lm_value" if c.needs_critic and not separate else "lm")
        rm = self.reward()
        cfg = _share_frozen(c, policy)  # as the RL stage configures it
        if getattr(cfg.sampling, "unroll_layers", False) is None:
            # the sampler's accelerator path (its layers scanned); unset, it would unroll
            # them on the CPU backend that compiles the plan (a CPU speed choice)
            cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling,
                                                                        unroll_layers=False))
        tx, policy_state, policy_shardings, policy_placed = _train_state(
            policy, self.cfg.optimizer, self.mesh)
        value_model = value_tx = value_state = value_shardings = value_placed = None
        if separate:  # the pipeline's value model: a copy of the reward model, trained
            value_model = rm
            value_tx, value_state, value_shardings, value_placed = _train_state(
                rm, self.cfg.optimizer, self.mesh)
        state_shardings = ppo_state_shardings(policy_shardings, self.mesh, value_shardings)
        state = jax.eval_shape(
            lambda: init_ppo_state(policy_state, cfg.kl, jax.random.key(0), value=value_state))
        state = _abstract(state, ppo_state_shardings(policy_placed, self.mesh, value_placed))
        ref = (_frozen_params(policy, self.mesh) if cfg.uses_reference
               and not _reference_is_base(cfg) else None)
        reward_params = _frozen_params(rm, self.mesh)
        p = self.cfg.prompt_len
        prompts = (_tokens((b, p), self.rows), _tokens((b, p), self.rows, bool))
        fn = make_ppo_iteration(
            policy_model=policy, reward_model=rm, policy_tx=tx, cfg=cfg, value_model=value_model,
            value_tx=value_tx, state_sharding=state_shardings, prompt_sharding=self.rows,
            frozen_shardings=(None if ref is None else policy.param_shardings(self.mesh),
                              rm.param_shardings(self.mesh)))
        rows = b * cfg.num_samples
        groups = [_state_groups(state.policy), {"inputs": (state.kl, state.rng, prompts),
                                                "frozen": (ref, reward_params)}]
        if state.value is not None:
            groups.append(_state_groups(state.value))
        return _Step(fn, (state, *prompts, ref, reward_params), _merge_groups(*groups),
                     rows=rows, kv_cache_bytes=self._kv_cache_bytes(policy, rows))

    def _kv_cache_bytes(self, policy, rows: int) -> int:
        """The sampler's cache (``sample``: ``P + R - 1`` slots, in the sampling dtype) under
        the activation rules."""
        cfg = policy.cfg
        slots = self.cfg.prompt_len + self.cfg.ppo.sampling.max_new_tokens - 1
        kv = (cfg.n_layers, rows, slots, cfg.num_kv_heads, cfg.per_head_dim)
        axes = ("layers", "batch", "cache_seq", "kv_heads", "kv")
        dtype = getattr(self.cfg.ppo.sampling, "dtype", None) or cfg.dtype  # sampling dtype
        return (2 * _hinted_shard_bytes(kv, dtype, axes, self.mesh)
                + _hinted_shard_bytes((rows, slots), bool, ("batch", "cache_seq"), self.mesh))


def batch_unit(cfg: PlanConfig, stage: str, data_parallel: int) -> int:
    """The smallest batch step a stage accepts on a mesh with ``data_parallel`` batch shards
    (``data x fsdp x expert``): ``data_parallel x num_microbatches`` for SFT, RM and DPO (every
    micro-batch splits over the shards); for PPO the smallest multiple ``B`` of
    ``data_parallel`` whose rollout ``B k`` divides by ``num_minibatches x data_parallel``
    (``rlhf_jax.train.ppo.minibatch_indices``)."""
    if stage == "ppo":
        k, m = cfg.ppo.num_samples, cfg.ppo.num_minibatches
        u = data_parallel
        while (u * k) % (m * data_parallel):
            u += data_parallel
        return u
    micro = {"sft": cfg.sft, "rm": cfg.rm, "dpo": cfg.dpo}[stage].num_microbatches
    return data_parallel * micro


def _compiler_options(mesh) -> dict | None:
    """On CPU, LLVM optimisation off: it halves the compile time, and the memory analysis
    (HLO buffer assignment, before code generation) is the same."""
    if mesh.devices.flat[0].platform == "cpu":
        return {"xla_backend_optimization_level": 0}
    return None


def _compile_stage(builder: _Builder, stage: str, batch: int) -> StagePlan:
    """Build, lower and compile ``stage``'s step at ``batch``; read the memory analysis."""
    step = builder.build(stage, batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", sharding.ShardingWarning)
        t0 = time.perf_counter()
        with jax.set_mesh(builder.mesh):
            lowered = step.fn.lower(*step.args)
        compiled = lowered.compile(compiler_options=_compiler_options(builder.mesh))
        seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is None:
        platform = builder.mesh.devices.flat[0].platform
        raise RuntimeError(f"plan: the {platform} compiler gives no memory analysis; plan on "
                           "fake CPU devices (JAX_PLATFORMS=cpu)")
    split = {k: shard_bytes(step.groups[k]) for k in ARGUMENT_GROUPS}
    split["kv_cache"] = step.kv_cache_bytes
    notes = tuple(dict.fromkeys(str(w.message) for w in caught
                                if issubclass(w.category, sharding.ShardingWarning)))
    return StagePlan(stage=stage, batch_size=batch, rows=step.rows,
                     argument_bytes=int(mem.argument_size_in_bytes),
                     output_bytes=int(mem.output_size_in_bytes),
                     alias_bytes=int(mem.alias_size_in_bytes),
                     temp_bytes=int(mem.temp_size_in_bytes), split=split,
                     compile_seconds=seconds, warnings=notes)


def largest_batch(measure: Callable[[int], int], unit: int, budget_bytes: int,
                  max_compiles: int, known: dict[int, int] | None = None
                  ) -> tuple[int, float | None, bool, dict[int, int]]:
    """The largest multiple of ``unit`` whose ``measure(batch)`` (total bytes, one compile)
    is at most ``budget_bytes``, with few measurements.

    Measures ``unit``, then doubles until there are two points; from then on, the line
    through the two measurements nearest the budget (the two largest fitting ones, or the
    largest fitting and the smallest failing one) predicts the largest fitting batch, which
    is measured (rounded down to a multiple of ``unit``, strictly inside the bracket, so each
    measurement narrows it). The search ends when the batch one ``unit`` above the largest
    fitting one is measured not to fit, or is predicted not to fit by the line through the
    two largest fitting measurements (total bytes grow linearly with the batch: the batch's
    inputs and activations), or after ``max_compiles`` measurements.

    Args:
      measure: batch -> total bytes per device.
      unit: the batch step (``batch_unit``); budget_bytes: the memory size.
      max_compiles: new measurements allowed (``known`` ones are free).
      known: batch -> bytes already measured (e.g. the configured batch).

    Returns:
      ``(batch, next_bytes, next_measured, measured)``: the largest batch measured to fit (0
      if ``unit`` does not fit); the bytes of ``batch + unit`` (of ``unit`` when none fits),
      measured or predicted by the line (``None``: no line yet); whether they were measured;
      and every measurement ``{batch: bytes}``.
    """
    seen = dict(known or {})
    left = max_compiles

    def get(b: int) -> int:
        nonlocal left
        if b not in seen:
            left -= 1
            seen[b] = measure(b)
        return seen[b]

    if get(unit) > budget_bytes:
        return 0, seen[unit], True, seen
    while True:
        below = sorted(b for b, v in seen.items() if v <= budget_bytes)
        fit = below[-1]
        over = [b for b, v in seen.items() if v > budget_bytes and b > fit]
        hi = min(over) if over else None
        if hi is not None:
            a, c = fit, hi
        elif len(below) > 1:
            a, c = below[-2], below[-1]
        else:
            a = c = fit
        slope = (seen[c] - seen[a]) / (c - a) if c != a else None
        nxt = fit + unit
        if nxt in seen:
            return fit, seen[nxt], True, seen
        predicted = None if slope is None else seen[fit] + slope * unit
        if hi is None and predicted is not None and predicted > budget_bytes:
            return fit, predicted, False, seen
        if left <= 0:
            return fit, predicted, False, seen
        if slope is not None and slope > 0:
            guess = fit + int((budget_bytes - seen[fit]) / slope // unit) * unit
        else:
            guess = 2 * fit if hi is None else (fit + hi) // 2 // unit * unit
        guess = max(guess, nxt)
        guess = min(guess, hi - unit) if hi is not None else min(guess, 64 * fit)
        get(guess)


def make_plan(cfg: PlanConfig, devices: Sequence[Any] | None = None,
              log: Callable[[str], None] | None = None) -> Plan:
    """Compile every requested stage for ``cfg``'s mesh and read its memory (module
    docstring); with ``hbm_gib`` also search each stage's largest batch that fits.

    Args:
      cfg: the plan.
      devices: the mesh's devices; default the first ``cfg.num_devices`` of ``jax.devices()``.
      log: called with a line after each compile (progress), e.g. ``print`` to stderr.

    Returns:
      ``Plan`` (bytes per device).

    Raises:
      ValueError: too few devices for the mesh, a mesh that does not match the device count,
        an unknown architecture (listing the known ones), a mesh axis that does not divide a
        parameter dimension (naming the parameter, e.g. heads over ``tensor``), or a batch
        that is not a multiple of a stage's unit (``batch_unit``, both numbers named).
      RuntimeError: the backend's compiler gives no memory analysis.
    """
    n = cfg.num_devices
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(f"plan: the mesh needs {n} devices, this process has {len(devices)} "
                         f"(run it with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                         "JAX_PLATFORMS=cpu, as `rlhf-jax plan` does by itself)")
    mesh = sharding.make_mesh(cfg.mesh, devices[:n])
    builder = _Builder(cfg, mesh)
    where = (f"{cfg.policy.path} on mesh " +
             " x ".join(f"{k}={v}" for k, v in mesh.shape.items()))
    try:  # raise on a mesh that does not divide the parameters before any compile
        builder.lm().param_shardings(mesh)
        builder.reward().param_shardings(mesh)
    except ValueError as e:
        raise ValueError(f"plan: {where}: {e}") from None
    units = {stage: batch_unit(cfg, stage, builder.dp) for stage in cfg.stages}
    for stage, unit in units.items():
        if (cfg.batch_size or unit) % unit:
            raise ValueError(f"plan: batch_size {cfg.batch_size} is not a multiple of the "
                             f"{stage} stage's batch unit {unit} (batch shards data x fsdp x "
                             f"expert = {builder.dp}{_unit_reason(cfg, stage)})")
    say = log or (lambda _: None)
    plans, fits = [], []
    for stage, unit in units.items():
        batch = cfg.batch_size or unit
        cache: dict[int, StagePlan] = {}

        def measure(b, stage=stage, cache=cache):
            cache[b] = _compile_stage(builder, stage, b)
            sp = cache[b]
            say(f"plan: {stage} batch {b}: {sp.total_bytes / GIB:.2f} GiB per device "
                f"(compiled in {sp.compile_seconds:.1f} s)")
            return sp.total_bytes

        measure(batch)
        plans.append(cache[batch])
        if cfg.hbm_gib is not None:
            budget = int(cfg.hbm_gib * GIB)
            b, nxt, nxt_measured, seen = largest_batch(
                measure, unit, budget, cfg.max_compiles, known={batch: cache[batch].total_bytes})
            fits.append(BatchFit(stage=stage, budget_bytes=budget, batch_size=b,
                                 total_bytes=seen[b] if b else None, unit=unit,
                                 next_bytes=None if nxt is None else int(nxt),
                                 next_measured=nxt_measured,
                                 compiled=tuple(sorted(seen.items()))))
    return Plan(config=cfg, model=builder.model_cfg, mesh_shape=dict(mesh.shape),
                platform=devices[0].platform, stages=tuple(plans), fits=tuple(fits))


def _unit_reason(cfg: PlanConfig, stage: str) -> str:
    if stage == "ppo":
        return (f", num_samples = {cfg.ppo.num_samples}, num_minibatches = "
                f"{cfg.ppo.num_minibatches}")
    micro = {"sft": cfg.sft, "rm": cfg.rm, "dpo": cfg.dpo}[stage].num_microbatches
    return f", num_microbatches = {micro}"


# ---- output ------------------------------------------------------------------------------
def _gib(x: int) -> str:
    return f"{x / GIB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def format_plan(plan: Plan) -> str:
    """The plan as a table in GiB per device, with where each number comes from."""
    c, m = plan.config, plan.model
    params = m.num_params
    lines = [
        f"rlhf-jax plan: {c.policy.path} ({_count(params)} parameters, {m.param_dtype} "
        f"storage, {m.dtype} compute, remat {'on' if m.remat else 'off'}, "
        f"{m.frozen_layers} frozen layers"
        + (f", LoRA rank {m.lora.rank}" + (f" over an {m.lora.quantize_base} base"
                                            if m.lora.quantize_base else "")
           if m.lora is not None else "") + ")",
        "mesh " + " ".join(f"{k}={v}" for k, v in plan.mesh_shape.items()) +
        f" on {math.prod(plan.mesh_shape.values())} {plan.platform} devices",
    ]
    if set(c.stages) - {"ppo"}:
        lines.append(f"sft / rm / dpo: {c.seq_len} tokens per sequence (rm, dpo: 2 per "
                     "comparison; the batch counts sequences or comparisons)")
    if "ppo" in c.stages:
        lines.append(
            f"ppo: prompt {c.prompt_len} + response {c.ppo.sampling.max_new_tokens} tokens, "
            f"{c.ppo.num_samples} sample(s) per prompt, {c.ppo.num_minibatches} "
            f"minibatch(es), value model {c.ppo.value_model if c.ppo.needs_critic else 'none'}"
            ", reference " + ("none" if not c.ppo.uses_reference else "the policy's LoRA base"
                              if m.lora is not None else "a copy of the policy")
            + " (the batch counts prompts)")
    lines.append("")
    head = ["GiB per device", "batch", "args", "outputs", "aliased", "temps", "total", "|",
            "params", "opt state", "frozen", "inputs", "KV cache", "activations"]
    if c.hbm_gib is not None:
        head += ["|", f"fits {c.hbm_gib:g} GiB"]
    rows = [head]
    for s in plan.stages:
        sp = s.split
        row = [s.stage, str(s.batch_size), _gib(s.argument_bytes), _gib(s.output_bytes),
               _gib(s.alias_bytes), _gib(s.temp_bytes), _gib(s.total_bytes), "|",
               _gib(sp["params"]), _gib(sp["optimizer_state"]), _gib(sp["frozen"]),
               _gib(sp["inputs"]), _gib(sp["kv_cache"]), _gib(s.activation_bytes)]
        if c.hbm_gib is not None:
            row += ["|", "yes" if s.total_bytes <= c.hbm_gib * GIB else "NO"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        lines.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                               for i, (x, w) in enumerate(zip(r, widths))).rstrip())
    if plan.fits:
        lines += ["", f"largest batch within {c.hbm_gib:g} GiB per device (each checked by "
                      "compiling it):"]
        for f in plan.fits:
            what = {"sft": "sequences", "rm": "comparisons", "dpo": "comparisons",
                    "ppo": "prompts"}[f.stage]
            if f.batch_size == 0:
                lines.append(f"  {f.stage:<4} none: the smallest batch ({f.unit} {what}) needs "
                             f"{_gib(f.next_bytes)} GiB")
                continue
            nxt = f.batch_size + f.unit
            if f.next_bytes is None:
                after = f"the search stopped before trying {nxt}"
            elif f.next_measured:
                after = f"{nxt} needs {_gib(f.next_bytes)} GiB"
            else:
                after = (f"{nxt} would need {_gib(f.next_bytes)} GiB by the linear fit"
                         + ("" if f.next_bytes > f.budget_bytes else
                            "; the search stopped before trying it"))
            lines.append(f"  {f.stage:<4} {f.batch_size} {what}: {_gib(f.total_bytes)} GiB "
                         f"({after}; {len(f.compiled)} batches compiled)")
    lines += [
        "",
        "From XLA's memory analysis of the compiled step: args, outputs, aliased (outputs "
        "written into the donated state), temps; total = args + outputs - aliased + temps.",
        "From shard arithmetic (per-device shard shape x item size): params (trained), opt "
        "state, frozen (reference and reward models; with LoRA also the base under the "
        "adapters), inputs (batch, keys, counters) - their sum is args, plus the few arrays "
        "the step never reads (jit leaves them out of the program, e.g. the reference's "
        "value head); KV cache (the PPO sampler's; rows over the batch axes, KV heads over "
        "tensor), a part of temps; activations = temps - KV cache.",
    ]
    if plan.platform == "cpu":
        lines.append("Compiled by XLA's CPU compiler on fake devices: args and outputs are "
                     "exact, temps are an estimate of what a TPU or GPU compiler allocates.")
    notes = dict.fromkeys(w for s in plan.stages for w in s.warnings)
    if notes:
        lines += ["", "sharding warnings:"] + [f"  {w}" for w in notes]
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict:
    """The plan as JSON types; every size in bytes per device (``xla`` and ``arithmetic``
    keys say where each comes from)."""
    from rlhf_jax.config import config_to_dict

    def stage(s: StagePlan) -> dict:
        return {"stage": s.stage, "batch_size": s.batch_size, "rows": s.rows,
                "compile_seconds": round(s.compile_seconds, 3),
                "xla": {"argument_bytes": s.argument_bytes, "output_bytes": s.output_bytes,
                        "alias_bytes": s.alias_bytes, "temp_bytes": s.temp_bytes,
                        "total_bytes": s.total_bytes},
                "arithmetic": dict(s.split),
                "activation_bytes": s.activation_bytes,
                "fits": (None if plan.config.hbm_gib is None
                         else s.total_bytes <= plan.config.hbm_gib * GIB),
                "warnings": list(s.warnings)}

    return {"config": config_to_dict(plan.config), "model": config_to_dict(plan.model),
            "num_params": plan.model.num_params, "mesh": plan.mesh_shape,
            "platform": plan.platform, "devices": math.prod(plan.mesh_shape.values()),
            "stages": [stage(s) for s in plan.stages],
            "largest_batch": [dataclasses.asdict(f) | {"exact": f.exact,
                                                       "compiled": [list(x) for x in f.compiled]}
                              for f in plan.fits]}


# ---- fake devices ------------------------------------------------------------------------
_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def fake_device_env(num_devices: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) for a process with ``num_devices`` fake CPU devices:
    ``JAX_PLATFORMS=cpu``, ``XLA_FLAGS`` with ``--xla_force_host_platform_device_count``
    replaced (other flags kept), and ``CHILD_ENV`` set."""
    env = dict(os.environ if env is None else env)
    flags = _COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env[CHILD_ENV] = "1"
    return env


__all__ = ["ARGUMENT_GROUPS", "BatchFit", "CHILD_ENV", "GIB", "Plan", "PlanConfig",
           "PlanPolicyConfig", "STAGES", "StagePlan", "batch_unit", "fake_device_env",
           "format_plan", "largest_batch", "make_plan", "plan_to_dict", "shard_bytes"]
