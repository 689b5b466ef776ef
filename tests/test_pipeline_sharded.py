"""The pipeline on an FSDP-8 mesh (``rlhf-jax pipeline --preset tiny --mesh.fsdp 8``), on the 8
fake CPU devices of tests/conftest.py: every parameter and optimizer tensor of every trained
stage is split 8 ways (each device holds 1/8), final parameters load back into the same
shardings, and a checkpoint round trip keeps them.

The tiny model's large tensors divide by 8 (vocab 49152, width 64, MLP 128).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax.checkpoint import Checkpointer, abstract_like
from rlhf_jax.pipeline import run, run_pipeline
from rlhf_jax.pipeline.artifacts import load_final
from rlhf_jax.presets import tiny
from rlhf_jax.sharding import MeshConfig, make_mesh

STAGES = ("sft", "rm", "ppo", "dpo")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    if jax.device_count() != 8:
        pytest.skip("needs the 8 fake devices of tests/conftest.py")
    cfg = tiny()
    env = os.environ.get("RLHF_JAX_CACHE")
    cfg = dataclasses.replace(
        cfg, out_dir=tmp_path_factory.mktemp("fsdp") / "run", cache_dir=Path(env) if env else None,
        stages=STAGES, mesh=MeshConfig(data=1, fsdp=8, tensor=1), checkpoint_every=0,
        sft=dataclasses.replace(cfg.sft, steps=2), rm=dataclasses.replace(cfg.rm, steps=2),
        ppo=dataclasses.replace(cfg.ppo, iterations=1), dpo=dataclasses.replace(cfg.dpo, steps=2))
    states = {}
    original = run.run_loop

    def capture(**kwargs):
        result = original(**kwargs)
        states[kwargs["stage"]] = result.state
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "run_loop", capture)
        run_pipeline(cfg)
    return cfg, states


def _arrays(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


def test_every_parameter_and_optimizer_tensor_is_split_8_ways(fsdp_run):
    _, states = fsdp_run
    assert set(states) == set(STAGES)
    for stage, state in states.items():
        train = state.policy if stage == "ppo" else state
        checked, whole = 0, []
        for where, x in _arrays((train.params, train.opt_state)):
            if x.ndim == 0:
                continue  # optimizer step counts
            assert len(x.addressable_shards) == 8, (stage, where)
            if any(sh.data.size * 8 != x.size for sh in x.addressable_shards):
                whole.append((where, x.shape, x.addressable_shards[0].data.shape))
            checked += 1
        assert not whole, (stage, whole)
        assert checked > 10, stage


def test_final_params_load_into_the_mesh_shardings(fsdp_run):
    cfg, _ = fsdp_run
    mesh = make_mesh(cfg.mesh)
    for stage in STAGES:
        model, params, _ = load_final(cfg.out_dir / stage / "final", mesh=mesh)
        expected = model.param_shardings(mesh)
        for (where, x), s in zip(_arrays(params), jax.tree.leaves(expected)):
            assert x.sharding.is_equivalent_to(s, x.ndim), (stage, where)


def test_checkpoint_round_trip_keeps_the_shardings(fsdp_run):
    cfg, states = fsdp_run
    for stage in ("sft", "dpo"):
        state = states[stage]
        with Checkpointer(cfg.out_dir / stage / "checkpoints") as ckpt:
            restored, _ = ckpt.restore(abstract_like(state))
        for (where, a), (_, b) in zip(_arrays(state), _arrays(restored)):
            assert b.sharding.is_equivalent_to(a.sharding, a.ndim), (stage, where)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
