"""The whole RLHF pipeline on the ``tiny`` preset (random tiny Llama, SmolLM2's tokenizer, the
built-in human sentiment ratings), shrunk further, run once for the module:

* a SIGTERM in the middle of DPO stops the run cleanly (no ``final/`` for the stage, a
  checkpoint at the step reached); the same command again skips the finished stages and
  continues DPO from its checkpoint;
* every stage's ``final/`` (parameters + ``model.json``), the policies' ``hf/`` checkpoints
  (loaded back with ``load_hf_checkpoint`` and equal to ``final/``), the metric records with
  their standard names and sane values, ``summary.json``, and ``report.md`` with existing,
  valid PNG plots and side-by-side SFT/PPO/DPO samples on the same prompts;
* re-running with ``resume=True`` skips the finished stages without touching their outputs;
  ``resume=False`` over the same directory refuses with ``FileExistsError``;
* a stage whose input stage has not run, and ``load_final`` of a missing stage, raise
  ``FileNotFoundError`` naming the path;
* on copies of the finished run: a changed configuration before a finished stage is refused
  (``config.json`` untouched), a neutral change is not; a stage killed between ``model.json``
  and its HF export redoes the export; ``--force-restart`` reruns a stage and moves the old
  outputs aside; a locked directory is refused; PPO with a separate value model runs.

Under tests/conftest.py's 8 fake CPU devices the run uses an FSDP-8 mesh (``--mesh.fsdp 8``):
every parameter and optimizer tensor of every trained stage is split 8 ways (each device
holds 1/8; the tiny model's large tensors divide by 8), final parameters load back into the
same shardings and a checkpoint round trip keeps them. The same pipeline as two processes x
4 devices gives the same results.
Assets come from ``$RLHF_JAX_CACHE`` (default ``~/.cache/rlhf_jax``), fetched through the
package index at most once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.checkpoint import abstract_like
from rlhf_jax.pipeline import (ConfigChangedError, PipelineConfig, StagePreempted, load_final,
                               run_pipeline, stages)
from rlhf_jax.pipeline import run as run_module
from rlhf_jax.pipeline.lock import RunLock, RunLockedError
from rlhf_jax.presets import tiny
from rlhf_jax.sharding import MeshConfig, make_mesh

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POLICIES = ("sft", "ppo", "dpo")
TRAINED = ("sft", "rm", "ppo", "dpo")


def _cache_dir() -> Path | None:
    env = os.environ.get("RLHF_JAX_CACHE")
    return Path(env) if env else None  # None: the library default ~/.cache/rlhf_jax


def tiny_config(out_dir: Path) -> PipelineConfig:
    """The tiny preset, shrunk: shorter snippets, one eval batch, on the test mesh."""
    cfg = tiny()
    if jax.device_count() == 8:
        mesh = MeshConfig(data=1, fsdp=8, tensor=1)  # batch 8 divides data x fsdp = 8
    elif jax.device_count() in (1, 2, 4):
        mesh = MeshConfig()
    else:
        pytest.skip(f"batch size 8 does not fit {jax.device_count()} devices")
    return dataclasses.replace(
        cfg, out_dir=out_dir, cache_dir=_cache_dir(), mesh=mesh,
        data=dataclasses.replace(cfg.data, max_words=10),
        eval=dataclasses.replace(cfg.eval, num_prompts=8, batch_size=8, samples_in_report=2))


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _run_logged(cfg: PipelineConfig):
    handler = _Messages()
    logger = logging.getLogger("rlhf_jax")
    logger.addHandler(handler)
    try:
        return run_pipeline(cfg), handler.messages
    except StagePreempted as e:
        handler.messages.append(str(e))
        return e, handler.messages
    finally:
        logger.removeHandler(handler)


@dataclasses.dataclass
class TinyRun:
    cfg: PipelineConfig
    out: Path
    summary: dict
    log: list[str]
    records: list[dict]
    preempted: dict  # what the first, SIGTERM-ed invocation returned and left on disk
    states: dict  # stage -> its train state at the end of its loop


def _sigterm_after_first_dpo_step(make_dpo_step):
    def make(*args, **kwargs):
        step = make_dpo_step(*args, **kwargs)
        calls = []

        def step_then_sigterm(*a):
            out = step(*a)
            calls.append(1)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        return step_then_sigterm
    return make


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> TinyRun:
    """The whole pipeline, in two invocations: the first is preempted (SIGTERM) after DPO's
    first step; the second (same command, ``resume=True``) skips SFT/RM/PPO, continues DPO
    from its checkpoint and runs the evaluation."""
    cfg = tiny_config(tmp_path_factory.mktemp("pipeline") / "run")
    out = Path(cfg.out_dir)
    states = {}
    original = run_module.run_loop

    def capture(**kwargs):
        result = original(**kwargs)
        states[kwargs["stage"]] = result.state
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "run_loop", capture)
        mp.setattr(stages, "make_dpo_step", _sigterm_after_first_dpo_step(stages.make_dpo_step))
        first, first_log = _run_logged(cfg)
    with Checkpointer(out / "dpo" / "checkpoints") as ckpt:
        dpo_steps = ckpt.all_steps()
    preempted = {"result": first, "log": first_log, "dpo_checkpoints": dpo_steps,
                 "finals": {s: (out / s / "final" / "model.json").exists() for s in TRAINED},
                 "report": (out / "report.md").exists(), "summary": (out / "summary.json").exists()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "run_loop", capture)
        summary, messages = _run_logged(cfg)
    return TinyRun(cfg=cfg, out=out, summary=summary, log=messages,
                   records=read_jsonl(out / "metrics.jsonl"), preempted=preempted, states=states)


def _stage(records, stage):
    return [r for r in records if r["stage"] == stage]


# ---- outputs of every stage ---------------------------------------------------------------
def test_every_stage_writes_final_and_checkpoints(tiny_run):
    cfg, out = tiny_run.cfg, tiny_run.out
    steps = {"sft": cfg.sft.steps, "rm": cfg.rm.steps, "ppo": cfg.ppo.iterations,
             "dpo": cfg.dpo.steps}
    for stage in TRAINED:
        meta = json.loads((out / stage / "final" / "model.json").read_text())
        assert meta["kind"] == ("scalar" if stage == "rm" else "lm"), stage
        assert meta["config"]["d_model"] == cfg.policy.random_model.d_model
        layers = cfg.policy.reward_layers if stage == "rm" else cfg.policy.random_model.n_layers
        assert meta["config"]["n_layers"] == layers, stage
        with Checkpointer(out / stage / "checkpoints") as ckpt:
            assert ckpt.latest_step() == steps[stage], stage
            record = ckpt.restore_meta()["stage_record"]
        assert record == json.loads((out / stage / "stage.json").read_text())
        assert record["stage"] == stage and record["task"] == "sentiment"
        assert (out / stage / "final" / "COMPLETE.json").exists()
    rm_meta = json.loads((out / "rm" / "final" / "model.json").read_text())
    assert np.isfinite(rm_meta["reward_gain"]) and rm_meta["reward_gain"] > 0
    assert np.isfinite(rm_meta["reward_bias"])
    assert 0.0 <= rm_meta["heldout_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["ppo"]["iterations"] == cfg.ppo.iterations
    assert config["data"]["max_words"] == 10


def test_hf_checkpoints_load_and_equal_final_params(tiny_run):
    from rlhf_jax.models.convert.hf import load_hf_checkpoint
    finals = {}
    for stage in POLICIES:
        model, params, _ = load_final(tiny_run.out / stage / "final")
        hf_model, hf_params = load_hf_checkpoint(tiny_run.out / stage / "hf")
        assert hf_model.kind == "lm"
        for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "tie_embeddings"):
            assert getattr(hf_model.cfg, field) == getattr(model.cfg, field), (stage, field)
        a, ta = jax.tree.flatten(jax.device_get(params))
        b, tb = jax.tree.flatten(jax.device_get(hf_params))
        assert ta == tb, stage
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
        assert (tiny_run.out / stage / "hf" / "tokenizer.json").exists()
        finals[stage] = a
    # PPO and DPO moved away from the SFT policy they started from
    for stage in ("ppo", "dpo"):
        assert any(not np.array_equal(x, y) for x, y in zip(finals[stage], finals["sft"])), stage


def test_metrics_have_standard_names_and_sane_values(tiny_run):
    cfg, records = tiny_run.cfg, tiny_run.records
    sft, rm, ppo, dpo = (_stage(records, s) for s in TRAINED)
    assert [r["step"] for r in sft] == list(range(1, cfg.sft.steps + 1))
    assert [r["step"] for r in rm] == list(range(1, cfg.rm.steps + 1))
    assert [r["step"] for r in ppo] == list(range(1, cfg.ppo.iterations + 1))
    assert [r["step"] for r in dpo] == list(range(1, cfg.dpo.steps + 1))

    for r in sft:
        assert 0 < r["sft/loss"] < 20  # nats per token, vocab 49152: ln V ~ 10.8
    for r in rm:
        assert 0 <= r["rm/accuracy"] <= 1 and np.isfinite(r["rm/loss"])
    rm_eval = _stage(records, "rm_eval")
    assert rm_eval and 0 <= rm_eval[-1]["rm/accuracy"] <= 1
    for r in ppo:
        for name in ("objective/kl", "objective/score", "ppo/policy/clipfrac", "ppo/val/error",
                     "rollout/response_length", "rollout/no_eos_share"):
            assert name in r and np.isfinite(r[name]), name
        assert 0 <= r["ppo/policy/clipfrac"] <= 1
        assert 0 <= r["rollout/no_eos_share"] <= 1
        sampling = cfg.ppo.ppo.sampling
        assert sampling.min_new_tokens == 3  # the preset's EOS floor reaches the rollouts
        assert sampling.min_new_tokens <= r["rollout/response_length"] <= sampling.max_new_tokens
        assert r["ppo/val/error"] >= 0
    # the first rollout comes from the reference policy itself: no KL yet
    assert ppo[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    for r in dpo:
        assert np.isfinite(r["dpo/rewards/margins"]) and np.isfinite(r["dpo/loss"])
    assert _stage(records, "dpo_eval")
    # the first DPO step starts at the reference: zero margin, loss ln 2
    assert abs(dpo[0]["dpo/rewards/margins"]) < 1e-5
    assert dpo[0]["dpo/loss"] == pytest.approx(np.log(2), abs=1e-5)


def test_summary_json_has_judge_means(tiny_run):
    summary = json.loads((tiny_run.out / "summary.json").read_text())
    assert summary == tiny_run.summary  # what run_pipeline returned
    for name in POLICIES:
        s = summary[name]
        assert -1.0 <= s["judge_mean"] <= 1.0
        assert np.isfinite(s["kl"])
        evals = _stage(tiny_run.records, f"eval_{name}")
        assert len(evals) == 1 and evals[0]["eval/judge_mean"] == pytest.approx(s["judge_mean"])
        sft_mean = summary["sft"]["judge_mean"]
        assert s["judge_delta"] == pytest.approx(s["judge_mean"] - sft_mean)
        # mean@2: two samples per prompt from one prefill, paired against SFT's
        assert -1.0 <= s["judge_mean_at_k"] <= 1.0
        assert s["judge_mean_at_k_delta"] == pytest.approx(
            s["judge_mean_at_k"] - summary["sft"]["judge_mean_at_k"])
    assert summary["baseline"] == "sft"
    assert summary["sft"]["judge_delta"] == 0.0
    assert summary["sft"]["kl"] == pytest.approx(0, abs=1e-5)
    rm_meta = json.loads((tiny_run.out / "rm" / "final" / "model.json").read_text())
    assert summary["rm_heldout_accuracy"] == rm_meta["heldout_accuracy"]


def test_report_with_valid_plots_and_samples(tiny_run):
    report = (tiny_run.out / "report.md").read_text()
    assert report.startswith("# rlhf_jax report: tiny")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 5
    for rel in images:
        png = tiny_run.out / rel
        assert png.is_file(), rel
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, rel
    stems = {Path(rel).stem for rel in images}
    assert {"sft", "rm", "ppo", "dpo", "rollout", "kl", "judge"} <= stems

    # summary table: one row per model
    for name in ("SFT", "PPO", "DPO"):
        assert re.search(rf"^\| {name} \| [+-]\d\.\d{{3}} ± ", report, re.M), name

    # samples: the same prompts, a completion of each model, each starting with its prompt
    samples = report.split("## Samples", 1)[1].split("## Notes", 1)[0]
    prompts = re.findall(r"^### Prompt \d+\n\n\| prompt \|\n\|---\|\n\| (.*) \|$", samples, re.M)
    assert 1 <= len(prompts) <= tiny_run.cfg.eval.samples_in_report
    for block, prompt in zip(samples.split("### Prompt ")[1:], prompts):
        rows = dict(re.findall(r"^\| (SFT|PPO|DPO) \| (.*) \|$", block, re.M))
        assert set(rows) == {"SFT", "PPO", "DPO"}
        for completion in rows.values():
            assert completion.startswith(prompt) and len(completion) > len(prompt)


# ---- resume and refusal -------------------------------------------------------------------
def test_sigterm_mid_stage_then_resume(tiny_run):
    first = tiny_run.preempted
    # the first invocation raised StagePreempted (the test process lives on), DPO unfinished
    assert isinstance(first["result"], StagePreempted)
    assert first["finals"] == {"sft": True, "rm": True, "ppo": True, "dpo": False}
    assert first["dpo_checkpoints"] == [1]
    assert not first["report"] and not first["summary"]  # eval never started
    assert any("dpo: stopped by SIGTERM at step 1" in m for m in first["log"]), first["log"]
    # the second continued DPO from step 1 and skipped every finished stage
    for stage in ("sft", "rm", "ppo"):
        assert any(m.startswith(f"{stage}: already finished") for m in tiny_run.log), stage
    assert "dpo: resumed from step 1" in tiny_run.log
    # each DPO step logged exactly once across the two processes, evaluated once at the end
    assert [r["step"] for r in _stage(tiny_run.records, "dpo")] == [1, 2, 3]
    assert [r["step"] for r in _stage(tiny_run.records, "dpo_eval")] == [3]
    for stage in ("sft", "rm", "ppo"):
        steps = [r["step"] for r in _stage(tiny_run.records, stage)]
        assert steps == sorted(set(steps)), stage


def test_resume_skips_finished_stages(tiny_run):
    cfg = dataclasses.replace(tiny_run.cfg, stages=TRAINED)  # eval always re-runs; leave it out
    finals = {s: tiny_run.out / s / "final" / "model.json" for s in TRAINED}
    before = {s: p.stat().st_mtime_ns for s, p in finals.items()}
    lines = (tiny_run.out / "metrics.jsonl").read_text().count("\n")
    _, messages = _run_logged(cfg)
    for stage in TRAINED:
        assert any(m.startswith(f"{stage}: already finished") for m in messages), (stage, messages)
    assert {s: p.stat().st_mtime_ns for s, p in finals.items()} == before
    assert (tiny_run.out / "metrics.jsonl").read_text().count("\n") == lines  # nothing trained


def test_no_resume_over_existing_run_refuses(tiny_run):
    cfg = dataclasses.replace(tiny_run.cfg, resume=False)
    config_before = (tiny_run.out / "config.json").read_bytes()
    with pytest.raises(FileExistsError, match=re.escape(str(tiny_run.out))):
        run_pipeline(cfg)
    assert (tiny_run.out / "config.json").read_bytes() == config_before  # nothing overwritten


def test_load_final_of_missing_stage(tmp_path):
    path = tmp_path / "ppo" / "final"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path / "model.json"))):
        load_final(path)


def test_stage_without_its_input_stage(tmp_path):
    cfg = dataclasses.replace(tiny_config(tmp_path / "run"), stages=("dpo",))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "run" / "sft" / "final"))):
        run_pipeline(cfg)


def test_unknown_stage_is_rejected():
    with pytest.raises(ValueError, match=r"unknown \['train'\]"):
        PipelineConfig(stages=("sft", "train"))


# ---- resume checks, atomic outputs, force-restart, lock (on copies of the finished run) ----
def _copy(tiny_run, tmp_path, **changes) -> PipelineConfig:
    import shutil
    out = tmp_path / "run"
    shutil.copytree(tiny_run.out, out, ignore=shutil.ignore_patterns(".lock"))
    return dataclasses.replace(tiny_run.cfg, out_dir=out, **changes)


def test_changed_config_before_a_finished_stage_is_refused(tiny_run, tmp_path):
    cfg = _copy(tiny_run, tmp_path, stages=("sft", "rm"))
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, steps=8))
    config_before = (cfg.out_dir / "config.json").read_bytes()
    with pytest.raises(ConfigChangedError, match=r"(?s)stage 'sft'.*sft\.steps: 4 -> 8.*--force-restart sft"):
        run_pipeline(cfg)
    assert (cfg.out_dir / "config.json").read_bytes() == config_before  # written only after the check
    # a different model width: refused at the first stage, not trained on the old width
    wide = dataclasses.replace(cfg.policy.random_model, d_model=128)
    cfg2 = dataclasses.replace(cfg, sft=tiny_run.cfg.sft, stages=("ppo",),
                               policy=dataclasses.replace(cfg.policy, random_model=wide))
    with pytest.raises(ConfigChangedError, match=r"policy\.random_model\.d_model: 64 -> 128"):
        run_pipeline(cfg2)


def test_result_neutral_change_is_allowed(tiny_run, tmp_path):
    cfg = _copy(tiny_run, tmp_path, stages=TRAINED, checkpoint_every=1, tensorboard=True)
    _, messages = _run_logged(cfg)
    assert all(any(m.startswith(f"{s}: already finished") for m in messages) for s in TRAINED)
    assert json.loads((cfg.out_dir / "config.json").read_text())["checkpoint_every"] == 1


def test_kill_between_model_json_and_hf_export_redoes_the_export(tiny_run, tmp_path):
    import shutil
    cfg = _copy(tiny_run, tmp_path, stages=("sft",))
    out = cfg.out_dir
    shutil.rmtree(out / "sft" / "hf")
    (out / "sft" / "final" / "COMPLETE.json").unlink()  # what a kill after model.json leaves
    before = jax.device_get(load_final(out / "sft" / "final")[1])
    _, messages = _run_logged(cfg)
    assert not any(m.startswith("sft: already finished") for m in messages)
    assert (out / "sft" / "final" / "COMPLETE.json").exists()
    assert (out / "sft" / "hf" / "model.safetensors").exists()
    assert not (out / "sft" / "hf.partial").exists()
    after = jax.device_get(load_final(out / "sft" / "final")[1])
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)  # restored from the last checkpoint, not retrained
    assert [r["step"] for r in _stage(read_jsonl(out / "metrics.jsonl"), "sft")] == [1, 2, 3, 4]


def test_force_restart_reruns_a_stage_and_keeps_the_old_outputs(tiny_run, tmp_path):
    cfg = _copy(tiny_run, tmp_path, stages=("dpo",), force_restart=("dpo",))
    _, messages = _run_logged(cfg)
    moved = list((cfg.out_dir / "replaced").glob("dpo-*"))
    assert len(moved) == 1 and (moved[0] / "final" / "COMPLETE.json").exists()
    assert (cfg.out_dir / "dpo" / "final" / "COMPLETE.json").exists()
    assert "dpo: resumed from step 1" not in messages  # trained from scratch


def test_second_run_on_a_locked_directory_is_refused(tiny_run, tmp_path):
    cfg = _copy(tiny_run, tmp_path, stages=TRAINED)
    with RunLock(cfg.out_dir):
        with pytest.raises(RunLockedError, match=str(os.getpid())):
            run_pipeline(cfg)


def test_ppo_with_a_separate_value_model(tiny_run, tmp_path):
    cfg = _copy(tiny_run, tmp_path, stages=("ppo",), force_restart=("ppo",))
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(
        cfg.ppo, ppo=dataclasses.replace(cfg.ppo.ppo, value_model="separate")))
    run_pipeline(cfg)
    ppo = _stage(read_jsonl(cfg.out_dir / "metrics.jsonl"), "ppo")
    assert [r["step"] for r in ppo] == [1, 2]
    assert all(np.isfinite(r["ppo/val/error"]) for r in ppo)
    assert json.loads((cfg.out_dir / "ppo" / "final" / "model.json").read_text())["kind"] == "lm"


def test_grpo_with_host_rewards_and_dynamic_sampling(tiny_run, tmp_path):
    """The staged RL path: GRPO (2 samples per prompt, no reference model), the reward model
    at weight 0.5 plus two host functions, dynamic sampling; then a reward function that
    returns NaN stops the run with an error naming it and the sample, and the checkpoint of
    the last finished iteration is kept."""
    from tests import _pipeline_rewards
    from rlhf_jax.rewards import RewardFunctionError
    cfg = _copy(tiny_run, tmp_path, stages=("ppo",), force_restart=("ppo",), checkpoint_every=1)
    grpo = dataclasses.replace(cfg.ppo.ppo, advantage="grpo", num_samples=2, kl_penalty="none",
                               loss_aggregation="sequence_mean")
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(
        cfg.ppo, ppo=grpo, reward_model_weight=0.5, dynamic_sampling=True,
        rewards=("rlhf_jax.tasks.sentiment.rewards:vader_positive",
                 "tests._pipeline_rewards:length_bonus=2")))
    run_pipeline(cfg)
    ppo = _stage(read_jsonl(cfg.out_dir / "metrics.jsonl"), "ppo")
    assert [r["step"] for r in ppo] == [1, 2]
    for r in ppo:
        for source in ("reward_model", "vader_positive", "length_bonus"):
            assert np.isfinite(r[f"reward/{source}/mean"])
        assert 0 <= r["reward/vader_positive/mean"] <= 1
        assert r["reward/length_bonus/seconds"] >= 0
        assert r["rollout/dynamic_sampling/kept_groups"] + \
            r["rollout/dynamic_sampling/filler_groups"] == cfg.ppo.batch_size
        assert "objective/kl" not in r and "ppo/val/error" not in r  # no reference, no critic
    assert json.loads((cfg.out_dir / "ppo" / "final" / "model.json").read_text())["kind"] == "lm"

    _pipeline_rewards.CALLS["n"] = 0
    bad = dataclasses.replace(cfg, force_restart=("ppo",), ppo=dataclasses.replace(
        cfg.ppo, dynamic_sampling=False, rewards=("tests._pipeline_rewards:fails_on_second_call",)))
    with pytest.raises(RewardFunctionError,
                       match=r"reward 'fails_on_second_call' .* returned nan for sample 3"):
        run_pipeline(bad)
    assert Checkpointer(bad.out_dir / "ppo" / "checkpoints").latest_step() == 1


# ---- the same pipeline as two processes ------------------------------------------------------
def test_two_processes_give_the_one_process_results(tiny_run, tmp_path):
    """The tiny pipeline as 2 processes x 4 devices on the same FSDP-8 mesh: each process
    feeds its rows of every batch and judges its rows of the evaluation. Final parameters of
    every stage and the evaluation's continuous results equal the one-process run's (the
    collectives differ, so within float tolerance; sampled tokens would only differ if a
    uniform draw fell within ~1e-6 of a categorical boundary)."""
    import _pipeline_worker as worker
    from test_multiprocess import _free_port, _wait_workers, REPO_ROOT
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), str(REPO_ROOT / "tests"),
                                                    env.get("PYTHONPATH")) if p)
    port = _free_port()
    procs = []
    for i in range(2):
        log = tmp_path / f"worker{i}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen(
                [sys.executable, str(Path(worker.__file__).resolve()), str(port), str(i), "2",
                 str(out)], cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), log))
    _wait_workers(procs, time.monotonic() + 900)

    one, two = tiny_run.summary, json.loads((out / "summary.json").read_text())
    for name in POLICIES:
        for key in ("judge_mean", "kl", "length", "rm_score"):
            assert two[name][key] == pytest.approx(one[name][key], rel=1e-3, abs=1e-4), (name, key)
    # an accuracy is a count: allow one of the 16 held-out pairs to flip on a near tie
    assert two["rm_heldout_accuracy"] == pytest.approx(one["rm_heldout_accuracy"], abs=1 / 16 + 1e-9)
    # Adam (eps 1e-8, lr 1e-3) moves a parameter whose gradient is ~0 by about +-lr, with the
    # sign set by rounding: a handful of elements may differ by up to a few lr; the rest agree
    # to float rounding.
    for stage in TRAINED:
        a = jax.tree.leaves(jax.device_get(load_final(tiny_run.out / stage / "final")[1]))
        b = jax.tree.leaves(jax.device_get(load_final(out / stage / "final")[1]))
        diff = np.concatenate([np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).ravel()
                               for x, y in zip(a, b)])
        assert diff.max() < 1e-2, (stage, diff.max())
        assert np.mean(diff > 1e-5) < 1e-4, (stage, np.sort(diff)[-10:])
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "sft"]
    assert [r["step"] for r in rows] == list(range(1, tiny_run.cfg.sft.steps + 1))  # process 0 writes


# ---- sharding on the FSDP-8 mesh ----------------------------------------------------------------
def _arrays(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


def test_every_parameter_and_optimizer_tensor_is_split_8_ways(tiny_run):
    if tiny_run.cfg.mesh.fsdp != 8:
        pytest.skip("needs the 8 fake devices of tests/conftest.py")
    assert set(tiny_run.states) == set(TRAINED)
    for stage, state in tiny_run.states.items():
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


def test_final_params_load_into_the_mesh_shardings(tiny_run):
    mesh = make_mesh(tiny_run.cfg.mesh)
    for stage in TRAINED:
        model, params, _ = load_final(tiny_run.out / stage / "final", mesh=mesh)
        expected = model.param_shardings(mesh)
        for (where, x), s in zip(_arrays(params), jax.tree.leaves(expected)):
            assert x.sharding.is_equivalent_to(s, x.ndim), (stage, where)


def test_checkpoint_round_trip_keeps_the_shardings(tiny_run):
    for stage in ("sft", "dpo"):
        state = tiny_run.states[stage]
        with Checkpointer(tiny_run.out / stage / "checkpoints") as ckpt:
            restored, _ = ckpt.restore(abstract_like(state))
        for (where, a), (_, b) in zip(_arrays(state), _arrays(restored)):
            assert b.sharding.is_equivalent_to(a.sharding, a.ndim), (stage, where)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


# ---- reward-model ensembles ------------------------------------------------------------------
def _run_capturing(cfg: PipelineConfig):
    """``run_pipeline(cfg)`` with each loop's keyword arguments and result recorded per stage
    (the trained state, the frozen parameters it was given)."""
    seen = {}
    original = run_module.run_loop

    def capture(**kwargs):
        result = original(**kwargs)
        seen[kwargs["stage"]] = {"state": result.state, "frozen": kwargs["frozen"]}
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "run_loop", capture)
        summary = run_pipeline(cfg)
    return summary, seen


@pytest.fixture(scope="module")
def ensemble_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run whose RM is an ensemble of 2 full members (Poisson bootstrap),
    then PPO on ``mean - 0.5 std`` of the normalised member scores (with a separate value
    model, initialised from member 0, and the gold-vs-proxy probe), then the evaluation."""
    cfg = _copy(tiny_run, tmp_path_factory.mktemp("ensemble"), stages=("rm", "ppo", "eval"),
                force_restart=("rm",))
    cfg = dataclasses.replace(
        cfg, rm=dataclasses.replace(cfg.rm, ensemble=2),
        ppo=dataclasses.replace(cfg.ppo, reward_aggregation="mean_minus_std",
                                reward_uncertainty_coef=0.5, probe_every=2, probe_prompts=8,
                                ppo=dataclasses.replace(cfg.ppo.ppo, value_model="separate")))
    summary, seen = _run_capturing(cfg)
    return cfg, summary, seen


def test_rm_ensemble_then_ppo_on_mean_minus_std(ensemble_run):
    cfg, summary, _ = ensemble_run
    out = Path(cfg.out_dir)
    meta = json.loads((out / "rm" / "final" / "model.json").read_text())
    assert meta["kind"] == "scalar" and meta["ensemble"] == 2
    assert meta["ensemble_trunk"] == "separate" and meta["bootstrap"] == "poisson"
    for name in ("reward_gain", "reward_bias"):
        assert len(meta[name]) == 2 and all(np.isfinite(meta[name])), name
    assert all(g > 0 for g in meta["reward_gain"]) and meta["warm_gain"] > 0
    assert np.isfinite(meta["warm_bias"])
    assert 0.0 <= meta["heldout_accuracy"] <= 1.0
    assert len(meta["member_heldout_accuracy"]) == 2
    records = read_jsonl(out / "metrics.jsonl")
    rm, rm_eval, ppo = (_stage(records, s) for s in ("rm", "rm_eval", "ppo"))
    assert [r["step"] for r in rm] == list(range(1, cfg.rm.steps + 1))
    for r in (*rm, *rm_eval):
        for name in ("rm/loss", "rm/member0/accuracy", "rm/member1/accuracy",
                     "rm/ensemble/accuracy", "rm/ensemble/std"):
            assert name in r and np.isfinite(r[name]), name
        assert 0 <= r["rm/ensemble/accuracy"] <= 1
    assert meta["heldout_accuracy"] == rm_eval[-1]["rm/ensemble/accuracy"]
    assert [r["step"] for r in ppo] == [1, 2]
    for r in ppo:
        assert np.isfinite(r["reward/reward_model/member_std"])
        assert r["reward/reward_model/member_std"] >= 0
        assert np.isfinite(r["reward/reward_model/mean"]) and np.isfinite(r["objective/kl"])
        assert np.isfinite(r["ppo/val/error"])
    probe = _stage(records, "ppo_eval")
    assert [r["step"] for r in probe] == [0, 2]
    assert all(np.isfinite(r["proxy/score"]) for r in probe)
    for name in POLICIES:  # the eval's RM column: the aggregated normalised score
        assert np.isfinite(summary[name]["rm_score"]), name
    assert summary["rm_heldout_accuracy"] == meta["heldout_accuracy"]


def test_rm_ensemble_params_round_trip_and_scorer(ensemble_run):
    """``load_final`` restores the stacked ``[K, ...]`` parameters exactly as trained, into
    the member shardings; the PPO stage was handed them; ``reward_model_scorer`` equals every
    member scored alone, normalised and aggregated in float64 NumPy."""
    from types import SimpleNamespace
    from jax.sharding import NamedSharding, PartitionSpec as P
    from rlhf_jax.sharding import DATA_AXES
    from rlhf_jax.train.common import sequence_scores
    from rlhf_jax.train.reward_ensemble import ensemble_param_shardings

    cfg, _, seen = ensemble_run
    mesh = make_mesh(cfg.mesh)
    rm, params, meta = load_final(Path(cfg.out_dir) / "rm" / "final", mesh=mesh)
    trained = seen["rm"]["state"].params
    ta, tb = jax.tree.structure(trained), jax.tree.structure(params)
    assert ta == tb
    for (where, a), (_, b), s in zip(_arrays(trained), _arrays(params),
                                     jax.tree.leaves(ensemble_param_shardings(rm, mesh))):
        assert b.shape[0] == 2 and b.shape[1:] == a.shape[1:], where
        assert b.sharding.is_equivalent_to(s, b.ndim), where
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
    handed = seen["ppo"]["frozen"][1]  # (reference, reward params) of the RL loop
    for (where, a), (_, b) in zip(_arrays(handed), _arrays(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)

    run = SimpleNamespace(cfg=cfg, mesh=mesh,
                          batch_sharding=lambda: NamedSharding(mesh, P(DATA_AXES)))
    scorer = stages.reward_model_scorer(run, rm, params, meta)
    assert scorer.ensemble == 2 and scorer.aggregation == "mean_minus_std"
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 500, (8, 12)).astype(np.int32)
    attn = np.ones((8, 12), bool)
    attn[:4, :3] = False  # left padding
    positions = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
    with jax.set_mesh(mesh):
        out = jax.device_get(scorer(tokens, positions, attn))
        single = jax.jit(sequence_scores, static_argnums=0)
        raw = np.stack([np.asarray(single(rm, stages.ensemble_member_params(params, meta, k),
                                          tokens, positions, attn), np.float64)
                        for k in range(2)])
    members = raw * np.asarray(meta["reward_gain"])[:, None] + np.asarray(meta["reward_bias"])[:, None]
    std = members.std(axis=0)
    np.testing.assert_allclose(out["std"], std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["score"], members.mean(axis=0) - 0.5 * std, rtol=1e-4, atol=1e-5)


def test_shared_trunk_ensemble_with_warm_runs_the_fused_path(tiny_run, tmp_path):
    """3 heads on one frozen trunk, then PPO with WARM: the heads are averaged into one
    reward model (no member axis) with its own gain/bias, the fused path runs (no staged
    reward metrics, no member std); the saved trunk is the SFT trunk untouched."""
    cfg = _copy(tiny_run, tmp_path, stages=("rm", "ppo"), force_restart=("rm",))
    cfg = dataclasses.replace(
        cfg, rm=dataclasses.replace(cfg.rm, ensemble=3, ensemble_trunk="shared"),
        ppo=dataclasses.replace(cfg.ppo, reward_aggregation="warm"))
    _, seen = _run_capturing(cfg)
    out = Path(cfg.out_dir)
    rm, params, meta = load_final(out / "rm" / "final")
    assert meta["ensemble"] == 3 and meta["ensemble_trunk"] == "shared"
    assert len(meta["reward_gain"]) == 3 and np.isfinite(meta["warm_gain"])
    abstract = rm.abstract_params()
    assert params["value_head"]["kernel"].shape == (3, *abstract["value_head"]["kernel"].shape)
    for (where, a), (_, b) in zip(_arrays(seen["rm"]["state"].params["value_head"]),
                                  _arrays(params["value_head"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
    _, sft, _ = load_final(out / "sft" / "final")
    layers = cfg.policy.reward_layers
    for (where, a), (_, b) in zip(_arrays(params["trunk"]),
                                  _arrays(stages._truncate_trunk(sft, layers)["trunk"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
    warm = seen["ppo"]["frozen"][1]  # the reward params the RL loop used: one model's
    assert jax.tree.map(lambda x: x.shape, warm) == jax.tree.map(lambda x: x.shape, abstract)
    np.testing.assert_allclose(np.asarray(warm["value_head"]["kernel"]),
                               np.asarray(params["value_head"]["kernel"]).mean(axis=0), rtol=1e-6)
    records = read_jsonl(out / "metrics.jsonl")
    rm_rows, ppo = _stage(records, "rm"), _stage(records, "ppo")
    assert all("rm/member2/accuracy" in r and "rm/ensemble/accuracy" in r for r in rm_rows)
    assert [r["step"] for r in ppo] == [1, 2]
    for r in ppo:
        assert "reward/reward_model/member_std" not in r and "reward/total/mean" not in r
        assert np.isfinite(r["objective/score"])


def test_iterated_rlhf_refreshes_the_reward_model_and_resumes_mid_round(tiny_run, tmp_path):
    """``ppo.refresh_every=1``: before iterations 2 and 3 the policy's samples are labelled by
    the gold reward and the proxy reward model trains on them (and on the human pairs). A run
    killed right after the first refresh round resumes from the checkpoint that holds the
    refreshed reward model and the comparison buffer, and ends where the uninterrupted run
    does. The gold-vs-proxy probe (``ppo.probe_every=1``) logs gold (VADER), the refreshed
    proxy and KL to the starting policy from step 0, one row per step across the resume."""
    from rlhf_jax.pipeline import refresh as refresh_module

    def config(sub):
        cfg = _copy(tiny_run, tmp_path / sub, stages=("ppo",), force_restart=("ppo",),
                    checkpoint_every=1)
        return dataclasses.replace(cfg, ppo=dataclasses.replace(
            cfg.ppo, iterations=3, refresh_every=1, refresh_pairs=8, refresh_steps=2,
            probe_every=1, probe_prompts=8))

    states = {}
    original_loop = run_module.run_loop

    def capture(**kwargs):
        result = original_loop(**kwargs)
        states[kwargs["out_dir"]] = result.state
        return result

    full = config("a")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "run_loop", capture)
        run_pipeline(full)

    killed = config("b")
    original_refresh = refresh_module.Refresher.refresh

    def refresh_then_sigterm(self, state, round_):
        out = original_refresh(self, state, round_)
        if round_ == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(refresh_module.Refresher, "refresh", refresh_then_sigterm)
        first, _ = _run_logged(killed)
    assert isinstance(first, StagePreempted)
    assert Checkpointer(killed.out_dir / "ppo" / "checkpoints").latest_step() == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "run_loop", capture)
        _, messages = _run_logged(dataclasses.replace(killed, force_restart=()))
    assert "ppo: resumed from step 2" in messages

    rows = {}
    for name, cfg in (("full", full), ("resumed", killed)):
        ppo = _stage(read_jsonl(cfg.out_dir / "metrics.jsonl"), "ppo")
        assert [r["step"] for r in ppo] == [1, 2, 3]
        assert "refresh/round" not in ppo[0]
        assert [ppo[1]["refresh/round"], ppo[2]["refresh/round"]] == [1.0, 2.0]
        assert [ppo[1]["refresh/pairs"], ppo[2]["refresh/pairs"]] == [8.0, 16.0]
        for r in ppo[1:]:
            assert 0 <= r["refresh/proxy_accuracy"] <= 1 and np.isfinite(r["refresh/rm_loss"])
        rows[name] = ppo
        # the gold-vs-proxy probe: step 0 (KL exactly 0: the policy is the reference) and
        # every iteration, one row per step after the resume
        probe = _stage(read_jsonl(cfg.out_dir / "metrics.jsonl"), "ppo_eval")
        assert [r["step"] for r in probe] == [0, 1, 2, 3]
        assert abs(probe[0]["probe/kl"]) < 1e-5 and probe[0]["probe/sqrt_kl"] < 1e-2
        for r in probe:
            assert -1 <= r["gold/score"] <= 1  # VADER compound
            assert np.isfinite(r["proxy/score"]) and np.isfinite(r["probe/kl"])
            assert r["probe/sqrt_kl"] == pytest.approx(np.sqrt(max(r["probe/kl"], 0.0)))
        rows[name + "_probe"] = probe
    for a, b in zip(rows["full"], rows["resumed"]):
        for key in ("refresh/proxy_accuracy", "refresh/gold_gap", "refresh/rm_loss",
                    "ppo/loss/total"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key

    for a, b in zip(rows["full_probe"], rows["resumed_probe"]):
        assert b["proxy/score"] == pytest.approx(a["proxy/score"], rel=1e-5, abs=1e-6)
    end_a, end_b = states[full.out_dir / "ppo"], states[killed.out_dir / "ppo"]
    _, rm_before, _ = load_final(full.out_dir / "rm" / "final")
    moved = [float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
             zip(jax.tree.leaves(end_a.rm.params), jax.tree.leaves(rm_before))]
    assert max(moved) > 0  # the proxy was retrained
    for x, y in zip(jax.tree.leaves((end_a.ppo.policy.params, end_a.rm.params)),
                    jax.tree.leaves((end_b.ppo.policy.params, end_b.rm.params))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
