"""``--policy.lora.*`` through the whole pipeline on the ``tiny`` preset (shrunk to a step or
two per stage): SFT, RM, PPO, DPO and the evaluation run with QLoRA adapters (rank 4, int8
base, adapter dropout) on the 8-device FSDP mesh, and

* every stage's ``final/params`` holds only the trained leaves (adapters, the reward model's
  head), with ``model.json`` naming the frozen base and its digest; the checkpoints too;
* ``Run.load_final`` rebuilds each stage's base (recursively) and the merged ``hf/`` export
  equals the adapted model merged; the reward model's base is the truncated SFT model;
* PPO and DPO hold no reference copy: their loops get ``None`` for the reference;
* the command line derives ``--policy.lora.rank``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.config import LoraConfig
from rlhf_jax.pipeline import run_pipeline
from rlhf_jax.pipeline import run as run_module
from rlhf_jax.presets import tiny
from rlhf_jax.sharding import MeshConfig

TRAINED = ("sft", "rm", "ppo", "dpo")


def _config(out_dir: Path):
    cfg = tiny()
    if jax.device_count() != 8:
        pytest.skip(f"needs the 8 fake devices, have {jax.device_count()}")
    cache = os.environ.get("RLHF_JAX_CACHE")
    one = lambda c, **kw: dataclasses.replace(c, **kw)  # noqa: E731
    return dataclasses.replace(
        cfg, out_dir=out_dir, cache_dir=Path(cache) if cache else None,
        mesh=MeshConfig(data=1, fsdp=8, tensor=1),
        policy=one(cfg.policy, lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1,
                                               quantize_base="int8")),
        data=one(cfg.data, max_words=10),
        sft=one(cfg.sft, steps=2), rm=one(cfg.rm, steps=2, eval_pairs=8),
        ppo=one(cfg.ppo, iterations=2), dpo=one(cfg.dpo, steps=2, eval_pairs=8),
        eval=one(cfg.eval, num_prompts=8, batch_size=8, num_samples=1, samples_in_report=1))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp("lora_pipeline") / "run")
    frozen = {}
    original = run_module.run_loop

    def capture(**kwargs):
        frozen[kwargs["stage"]] = kwargs.get("frozen", ())
        return original(**kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "run_loop", capture)
        summary = run_pipeline(cfg)
    return cfg, Path(cfg.out_dir), summary, frozen


def _stored_names(directory: Path) -> set[str]:
    with Checkpointer(directory) as ckpt:
        stored = ckpt._manager.item_metadata(ckpt.latest_step())["state"]
    return {"/".join(str(getattr(k, "key", k)) for k in p)
            for p, _ in jax.tree_util.tree_flatten_with_path(
                stored, is_leaf=lambda x: hasattr(x, "shape"))[0]}


def test_every_stage_runs_and_saves_only_what_trains(lora_run):
    cfg, out, summary, _ = lora_run
    for name in ("sft", "ppo", "dpo"):
        assert np.isfinite(summary[name]["kl"]), name
    expected_base = {"sft": "initial", "rm": "sft", "ppo": "sft", "dpo": "sft"}
    for stage in TRAINED:
        meta = json.loads((out / stage / "final" / "model.json").read_text())
        assert meta["config"]["lora"]["rank"] == 4
        assert meta["lora_base"]["from"] == expected_base[stage]
        assert len(meta["lora_base"]["digest"]) == 64
        finals = _stored_names(out / stage / "final" / "params")
        assert finals and all(n.endswith(("lora_a", "lora_b")) or n.startswith("value_head")
                              for n in finals), (stage, sorted(finals)[:4])
        assert any(n.startswith("value_head") for n in finals) == (stage == "rm")
        ckpt = _stored_names(out / stage / "checkpoints")  # params, moments, step, key
        frozen = [n for n in ckpt if n.endswith(("kernel", "kernel_q", "embed", "scale"))
                  and "value_head" not in n]
        assert not frozen, (stage, frozen[:3])
        assert any("params/" in n and n.endswith("lora_b") for n in ckpt), stage
    rm_meta = json.loads((out / "rm" / "final" / "model.json").read_text())
    assert rm_meta["lora_base"]["n_layers"] == cfg.policy.reward_layers


def test_ppo_and_dpo_hold_no_reference_copy(lora_run):
    _, _, _, frozen = lora_run
    assert frozen["dpo"] == (None,)
    assert frozen["ppo"][0] is None and frozen["ppo"][1] is not None  # the reward model


def test_load_final_rebuilds_the_base_and_hf_is_the_merged_model(lora_run):
    from rlhf_jax.models.convert.hf import load_hf_checkpoint
    from rlhf_jax.pipeline.run import Run
    cfg, out, _, _ = lora_run
    run = Run.create(cfg)
    try:
        for stage in ("sft", "ppo", "dpo"):
            model, params, _ = run.load_final(stage)
            assert model.cfg.lora.quantize_base == "int8"
            kernel_q = params["trunk"]["blocks"]["attn"]["q"]["kernel_q"]
            assert kernel_q.dtype == np.int8 and len(kernel_q.sharding.device_set) == 8
            plain, merged = run.merged(model, params)
            hf_model, hf_params = load_hf_checkpoint(out / stage / "hf")
            assert hf_model.cfg.lora is None and hf_model.cfg.n_layers == plain.cfg.n_layers
            a = jax.tree.leaves(jax.device_get(merged))
            b = jax.tree.leaves(jax.device_get(hf_params))
            assert len(a) == len(b)
            for x, y in zip(a, b):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
        rm, rm_params, _ = run.load_final("rm")
        assert rm.kind == "scalar" and rm.cfg.n_layers == cfg.policy.reward_layers
        assert "value_head" in rm_params
    finally:
        run.close()


def test_command_line_derives_the_lora_flags():
    from rlhf_jax.cli import parse_pipeline_args
    cfg = parse_pipeline_args("pipeline", ["--preset", "tiny", "--policy.lora.rank", "16",
                                           "--policy.lora.targets", "q", "v", "mlp",
                                           "--policy.lora.quantize-base", "int4"])
    assert cfg.policy.lora == LoraConfig(rank=16, targets=("q", "v", "mlp"), quantize_base="int4")
    assert parse_pipeline_args("pipeline", ["--preset", "tiny"]).policy.lora.rank is None
