"""The memory planner (``rlhf_jax.plan``, ``rlhf-jax plan``) against independent arithmetic:
real arrays' bytes on a device, the 1/8 of FSDP over 8 devices, published parameter counts,
and an 8B PPO iteration compiled on 64 fake devices."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import sharding
from rlhf_jax.cli import main
from rlhf_jax.config import LoraConfig, ModelConfig
from rlhf_jax.models.architectures import ARCHITECTURES, resolve_architecture
from rlhf_jax.models.convert.hf_config import hf_config_dict
from rlhf_jax.models.model import Model
from rlhf_jax.plan import (GIB, PlanConfig, PlanPolicyConfig, batch_unit, fake_device_env,
                           format_plan, largest_batch, make_plan, shard_bytes)
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.train.ppo import PPOConfig, init_ppo_state, make_ppo_iteration, ppo_state_shardings
from rlhf_jax.train.state import (OptimizerConfig, create_sharded_train_state, make_optimizer,
                                  train_state_shardings)

# Every sharded dimension (vocab, width, heads, KV heads, MLP) divides 8.
TINY = ModelConfig(arch="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                   n_kv_heads=2, mlp_dim=128, max_positions=128)
# The sampler's scanned layer loop, which the plan compiles (unset, the sampler would unroll
# its layers on the CPU backend).
SAMPLING = SamplingConfig(max_new_tokens=4, eos_token_id=1, pad_token_id=0, **(
    {"unroll_layers": False}
    if "unroll_layers" in {f.name for f in dataclasses.fields(SamplingConfig)} else {}))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An HF checkpoint directory holding only ``config.json`` (the planner needs no weights)."""
    path = tmp_path_factory.mktemp("tiny")
    (path / "config.json").write_text(json.dumps(hf_config_dict(TINY)))
    return path


def _plan_cfg(path, **kw) -> PlanConfig:
    kw.setdefault("seq_len", 32)
    kw.setdefault("prompt_len", 8)
    kw.setdefault("ppo", PPOConfig(sampling=SAMPLING, num_ppo_epochs=1))
    kw.setdefault("policy", PlanPolicyConfig(path=str(path)))
    return PlanConfig(**kw)


def _placed(model: Model, mesh):
    """Real parameter arrays of ``model`` (zeros: only their bytes matter here) placed with
    the model's shardings, as the pipeline places loaded weights."""
    abstract = model.abstract_params()
    return jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
                   out_shardings=model.param_shardings(mesh))()


def _bytes_on(device, tree) -> int:
    """Bytes of ``tree``'s shards that live on ``device`` (real arrays)."""
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == device)


# ---- named architectures -------------------------------------------------------------------
@pytest.mark.parametrize("name, published", [
    ("llama3-8b", 8.03e9), ("llama3-70b", 70.6e9), ("llama3.2-1b", 1.24e9),
    ("qwen2.5-7b", 7.62e9), ("qwen2.5-0.5b", 0.494e9), ("smollm2-135m", 134.5e6)])
def test_named_architectures_have_the_published_parameter_counts(name, published):
    assert ARCHITECTURES[name].num_params == pytest.approx(published, rel=0.005)


def test_named_architecture_round_trips_through_an_hf_config(tmp_path):
    cfg = ARCHITECTURES["qwen2.5-7b"]
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    assert resolve_architecture(tmp_path) == cfg
    assert resolve_architecture("qwen2.5-7b", dtype="bfloat16").dtype == "bfloat16"


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama3-8b.*qwen2.5-7b.*smollm2-135m"):
        resolve_architecture("llama9-1t")


# ---- the plan on 8 fake devices -------------------------------------------------------------
def test_fsdp8_arguments_are_an_eighth_of_fsdp1(tiny_dir):
    """FSDP over 8 devices holds 1/8 of the parameters and optimizer state that pure data
    parallelism replicates on each (XLA's argument sizes); the batch is split alike."""
    replicated, fsdp = (make_plan(_plan_cfg(tiny_dir, stages=("sft",), devices=8,
                                            mesh=sharding.MeshConfig(data=d, fsdp=f))).stages[0]
                        for d, f in ((8, 1), (1, 8)))
    assert fsdp.argument_bytes / replicated.argument_bytes == pytest.approx(1 / 8, rel=0.01)
    for group in ("params", "optimizer_state"):  # shard arithmetic: exactly 1/8 (all divide)
        assert 8 * fsdp.split[group] == pytest.approx(replicated.split[group], rel=1e-3)
    # the state is donated: its output is written into the argument's buffers
    assert fsdp.alias_bytes >= fsdp.split["params"] + fsdp.split["optimizer_state"]


def test_plan_agrees_with_real_arrays_and_the_pipelines_compiled_step(tiny_dir):
    """A PPO iteration (value head, reference, reward model, 2 samples per prompt) on a
    (fsdp=4, tensor=2) mesh: the plan's argument split equals the bytes of the real arrays the
    RL stage builds, on a device; XLA's argument total equals their sum less what the step
    never reads; and the iteration
    compiled from the real arrays as the RL stage jits it has the same memory analysis."""
    mesh_cfg = sharding.MeshConfig(fsdp=4, tensor=2)
    ppo = PPOConfig(sampling=SAMPLING, num_ppo_epochs=1, num_samples=2)
    cfg = _plan_cfg(tiny_dir, stages=("ppo",), mesh=mesh_cfg, batch_size=8, ppo=ppo,
                    policy=PlanPolicyConfig(path=str(tiny_dir), dtype="float32"))
    planned = make_plan(cfg).stages[0]
    assert planned.rows == 16

    # The real arrays, built as the RL stage builds them (rlhf_jax.pipeline.stages.run_ppo).
    mesh = sharding.make_mesh(mesh_cfg)
    policy, rm = Model(TINY, kind="lm_value"), Model(TINY, kind="scalar")
    params = _placed(policy, mesh)
    tx = make_optimizer(OptimizerConfig(), params)
    policy_shardings = policy.param_shardings(mesh)
    policy_state = create_sharded_train_state(params, tx, jax.random.key(1), mesh,
                                              policy_shardings)
    state_shardings = ppo_state_shardings(
        train_state_shardings(policy_shardings, tx, jax.eval_shape(lambda: params), mesh), mesh)
    state = jax.jit(lambda s: init_ppo_state(s, ppo.kl, jax.random.key(2)),
                    out_shardings=state_shardings)(policy_state)
    ref, reward = _placed(policy, mesh), _placed(rm, mesh)
    rows = NamedSharding(mesh, PartitionSpec(sharding.DATA_AXES))
    prompts = jax.device_put(np.ones((8, cfg.prompt_len), np.int32), rows)
    prompt_mask = jax.device_put(np.ones((8, cfg.prompt_len), bool), rows)
    args = (state, prompts, prompt_mask, ref, reward)

    dev = mesh.devices.flat[0]
    assert planned.split["params"] == _bytes_on(dev, state.policy.params)
    assert planned.split["optimizer_state"] == _bytes_on(dev, state.policy.opt_state)
    assert planned.split["frozen"] == _bytes_on(dev, (ref, reward))
    assert planned.split["inputs"] == _bytes_on(
        dev, (state.policy.step, state.policy.rng, state.kl, state.rng, prompts, prompt_mask))
    # jit drops the arguments a step never reads from the compiled program: here the
    # reference's value head (the reference is the policy's tree; only its LM part runs)
    assert planned.argument_bytes == _bytes_on(dev, args) - _bytes_on(dev, ref["value_head"])

    iteration = make_ppo_iteration(
        policy_model=policy, reward_model=rm, policy_tx=tx, cfg=ppo,
        state_sharding=state_shardings, prompt_sharding=rows,
        frozen_shardings=(policy_shardings, rm.param_shardings(mesh)))
    with jax.set_mesh(mesh):  # LLVM optimisation off, as the planner compiles on CPU
        mem = iteration.lower(*args).compile(
            compiler_options={"xla_backend_optimization_level": 0}).memory_analysis()
    assert (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
            mem.temp_size_in_bytes) == (planned.argument_bytes, planned.output_bytes,
                                        planned.alias_bytes, planned.temp_bytes)
    assert 0 < planned.split["kv_cache"] < planned.temp_bytes


def test_lora_ppo_trains_only_adapters_and_keeps_no_reference_copy(tiny_dir):
    """LoRA rank 4 on every projection, PPO on a (fsdp=4, tensor=2) mesh: the plan's split
    equals the bytes on a device of the real arrays the RL stage builds - trained: the
    policy's adapters and value head (their count checked against the LoRA shapes), Adam's two
    moments of them; frozen: the policy's base (sharded like the full model's parameters) and
    the reward model; no reference copy (the reference is the policy's base)."""
    from rlhf_jax.models.lora import partition

    r, c = 4, dataclasses.replace(TINY, lora=LoraConfig(rank=4))
    d, h, kv, k, f = c.d_model, c.n_heads, c.num_kv_heads, c.per_head_dim, c.mlp_dim
    # q, k, v, o, gate, up, down: A [in, r] and B [r, out] per layer
    adapters = c.n_layers * r * ((d + h * k) + 2 * (d + kv * k) + (h * k + d) + 3 * (d + f))
    mesh_cfg = sharding.MeshConfig(fsdp=4, tensor=2)
    cfg = _plan_cfg(tiny_dir, stages=("ppo",), mesh=mesh_cfg, batch_size=8,
                    policy=PlanPolicyConfig(path=str(tiny_dir), lora=LoraConfig(rank=r)))
    split = make_plan(cfg).stages[0].split

    mesh = sharding.make_mesh(mesh_cfg)
    policy, rm = Model(c, kind="lm_value"), Model(c, kind="scalar")
    params = _placed(policy, mesh)
    tx = make_optimizer(OptimizerConfig(), params)
    state = create_sharded_train_state(params, tx, jax.random.key(1), mesh,
                                       policy.param_shardings(mesh))
    reward = _placed(rm, mesh)
    trained, base = partition(state.params)
    assert sum(x.size for x in jax.tree.leaves(trained)) == adapters + d + 1
    dev = mesh.devices.flat[0]
    assert split["params"] == _bytes_on(dev, trained)
    assert split["optimizer_state"] == _bytes_on(dev, state.opt_state)
    assert split["frozen"] == _bytes_on(dev, (base, reward))
    assert 8 * _bytes_on(dev, base) == pytest.approx(4 * TINY.num_params, rel=0.01)


def test_largest_batch_on_a_linear_and_a_convex_cost():
    calls = []

    def linear(b):
        calls.append(b)
        return 1000 + 37 * b

    b, nxt, measured, seen = largest_batch(linear, 8, 1000 + 37 * 200, max_compiles=5)
    assert b == 200 and nxt == 1000 + 37 * 208 and len(calls) <= 4
    assert all(v <= 1000 + 37 * 200 for k, v in seen.items() if k <= 200)

    def convex(b):
        return 1000 + b * b

    budget = 1000 + 300 ** 2
    b, nxt, measured, seen = largest_batch(convex, 4, budget, max_compiles=12)
    assert convex(b) <= budget < convex(b + 4) and measured and nxt == convex(b + 4)
    assert largest_batch(convex, 4, 1000, max_compiles=3)[:3] == (0, convex(4), True)


def test_largest_batch_that_fits_is_checked_by_compiling(tiny_dir):
    """With ``hbm_gib`` a little above the smallest batch's total, the search returns the
    largest batch it compiled that fits, and the next batch step (compiled, or predicted by
    its linear fit) does not fit."""
    base = _plan_cfg(tiny_dir, stages=("sft",), devices=8, mesh=sharding.MeshConfig(fsdp=8))
    smallest = make_plan(base).stages[0].total_bytes
    budget = int(1.3 * smallest)
    plan = make_plan(dataclasses.replace(base, hbm_gib=budget / GIB, max_compiles=3))
    fit = plan.fits[0]
    compiled = dict(fit.compiled)
    assert fit.unit == 8 and fit.batch_size >= 8 and compiled[8] == smallest
    assert fit.total_bytes == compiled[fit.batch_size] <= budget
    assert all(v > budget for b, v in compiled.items() if b > fit.batch_size)
    assert fit.next_bytes > budget and len(compiled) <= 4
    table = format_plan(plan)
    assert f"sft  {fit.batch_size} sequences" in table and "fits" in table


def test_batch_units_and_errors(tiny_dir):
    cfg = _plan_cfg(tiny_dir, ppo=PPOConfig(sampling=SAMPLING, num_samples=2, num_minibatches=4))
    assert batch_unit(cfg, "ppo", 8) == 16  # 16 prompts x 2 samples = 4 minibatches x 8 shards
    assert batch_unit(dataclasses.replace(cfg, sft=dataclasses.replace(
        cfg.sft, num_microbatches=2)), "sft", 8) == 16
    with pytest.raises(ValueError, match=r"heads.*not divisible by mesh axes \('tensor',\) "
                                         r"of size 8"):
        make_plan(_plan_cfg(tiny_dir, mesh=sharding.MeshConfig(tensor=8), devices=8))
    with pytest.raises(ValueError, match="batch_size 12 is not a multiple of the sft stage's "
                                         "batch unit 8"):
        make_plan(_plan_cfg(tiny_dir, stages=("sft",), batch_size=12,
                            mesh=sharding.MeshConfig(fsdp=8)))
    with pytest.raises(ValueError, match="needs 16 devices, this process has 8"):
        make_plan(_plan_cfg(tiny_dir, mesh=sharding.MeshConfig(fsdp=16)))
    with pytest.raises(ValueError, match="stages"):
        _plan_cfg(tiny_dir, stages=("eval",))


def test_shard_bytes_of_keys_packed_int4_and_shardings():
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=8))
    rows = NamedSharding(mesh, PartitionSpec(sharding.DATA_AXES))
    key = jax.eval_shape(lambda: jax.random.key(0))
    assert shard_bytes(key) == jax.random.key_data(jax.random.key(0)).nbytes
    assert shard_bytes(jax.ShapeDtypeStruct((16, 6), jnp.int4)) == 48  # two per byte
    assert shard_bytes(jax.ShapeDtypeStruct((16, 6), jnp.bfloat16, sharding=rows)) == 2 * 6 * 2
    assert shard_bytes({"a": None, "b": jax.ShapeDtypeStruct((3,), np.float32)}) == 12


# ---- the command line ----------------------------------------------------------------------
def test_fake_device_env_replaces_only_the_device_count():
    env = fake_device_env(64, {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8",
                               "JAX_PLATFORMS": "tpu"})
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=64"]
    assert env["JAX_PLATFORMS"] == "cpu"


def test_cli_help_explains_fake_devices(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "xla_force_host_platform_device_count" in out and "llama3-8b" in out


def test_cli_runs_itself_on_more_fake_devices(tiny_dir, capfd):
    """16 devices asked for, 8 here: the command re-executes itself on 16 fake CPU devices."""
    main(["plan", "--policy.path", str(tiny_dir), "--mesh.fsdp", "16", "--stages", "sft",
          "--seq-len", "32", "--json"])
    out = json.loads(capfd.readouterr().out)
    assert out["devices"] == 16 and out["platform"] == "cpu"
    [sft] = out["stages"]
    assert sft["batch_size"] == 16
    assert sum(sft["arithmetic"][k] for k in ("params", "optimizer_state", "frozen", "inputs")) \
        == sft["xla"]["argument_bytes"]


@pytest.mark.slow
def test_8b_ppo_iteration_compiles_on_64_devices():
    """Llama-3-8B-shaped PPO (value head, reference and reward model, prompt 512 + response
    512) on a (fsdp=16, tensor=4) mesh of 64 fake devices, in its own process; the per-device
    parameters, optimizer state and frozen models agree with the parameter count."""
    cmd = [sys.executable, "-m", "rlhf_jax.cli", "plan", "--policy.path", "llama3-8b",
           "--mesh.fsdp", "16", "--mesh.tensor", "4", "--stages", "ppo", "--json"]
    done = subprocess.run(cmd, env=fake_device_env(64), capture_output=True, text=True,
                          timeout=900, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["devices"] == 64
    [ppo] = out["stages"]
    cfg = ARCHITECTURES["llama3-8b"]
    n, d, v = cfg.num_params, cfg.d_model, cfg.vocab_size
    split = ppo["arithmetic"]
    policy_bytes = 4 * (n + d + 1) / 64  # float32, value head, 64-way sharded
    reward_bytes = 4 * (n - v * d + d + 1) / 64  # no LM head
    assert split["params"] == pytest.approx(policy_bytes, rel=1e-3)
    assert split["optimizer_state"] == pytest.approx(2 * policy_bytes, rel=1e-3)
    assert split["frozen"] == pytest.approx(policy_bytes + reward_bytes, rel=1e-3)
    xla = ppo["xla"]
    held = sum(split[k] for k in ("params", "optimizer_state", "frozen", "inputs"))
    # XLA's arguments lack only what the step never reads: the reference's value head
    assert 0 <= held - xla["argument_bytes"] <= 4 * (d + 1)
    assert 0 < split["kv_cache"] < xla["temp_bytes"]
    assert xla["total_bytes"] == (xla["argument_bytes"] + xla["output_bytes"]
                                  - xla["alias_bytes"] + xla["temp_bytes"])
