"""``rlhf-jax sweep`` (``rlhf_jax.sweeps``): grids x seeds over the pipeline with content-addressed
stage outputs.

Without training:
* grid parsing: values converted to each field's type; a bad path, a section, a bad value, a
  repeated or empty value raise errors naming the path and the value;
* the plan: point order (first axis slowest, seeds innermost), configurations, run
  directories; plans the configuration checks refuse name the point;
* content addresses: a PPO-only change keeps the SFT, RM and DPO addresses; a seed, an RM
  change or an upstream change moves what depends on it; result-neutral fields move nothing;
* the table: mean ± s.e. over seeds (sample std / sqrt(n)) against a NumPy hand computation
  on fabricated summaries, n = 1 without an s.e., unfinished runs listed; ``--report-only``;
  the plot registry takes a new kind;
* the CLI: named sweeps, overrides, ``--list``, errors; ``tpu_scripts/launch.sh --index``;
* the waiting lock, and a point held by another process is skipped.

With training (the ``tiny`` preset shrunk as in tests/test_pipeline.py, two KL coefficients x
one seed, stages SFT -> RM -> PPO -> eval, through ``rlhf_jax.cli.main``):
``--index 1`` runs one point; the whole sweep then trains only the other point's PPO, and a
SIGTERM after its first iteration exits 75 with a checkpoint; the same command again waits
for the PPO stage's lock (held by "another process"), continues PPO from its checkpoint and
writes the table. Over all of it SFT and RM train once, in one shared directory each.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import cli, report, sweeps
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.pipeline import run as run_module
from rlhf_jax.pipeline import stages as stages_module
from rlhf_jax.pipeline.artifacts import stage_identity
from rlhf_jax.pipeline.lock import RunLock, RunLockedError
from rlhf_jax.presets import tiny
from rlhf_jax.sweeps import GridAxis, SweepSpec, parse_grid, plan_sweep
from rlhf_jax.train.loop import EXIT_PREEMPTED

from test_pipeline import PNG_MAGIC, _Messages, tiny_config
from test_scripts import BASH, TPU_DIR, _dry_env, _run, failing_gcloud  # noqa: F401

KL = "ppo.ppo.kl.init_kl_coef"


# ---- grid parsing -------------------------------------------------------------------------
def test_grid_values_take_the_field_type():
    assert parse_grid(f"{KL}=0.01,0.05,2e-1") == GridAxis(KL, (0.01, 0.05, 0.2))
    assert parse_grid("ppo.ppo.kl.init-kl-coef=1") == GridAxis(KL, (1.0,))  # '-' as on the CLI
    axis = parse_grid("ppo.iterations=3, 10")
    assert axis.values == (3, 10) and all(type(v) is int for v in axis.values)
    assert parse_grid("ppo.task_rewards=true,no").values == (True, False)
    assert parse_grid("ppo.ppo.kl.kind=fixed,adaptive").values == ("fixed", "adaptive")
    assert parse_grid("policy.reward_layers=none,1").values == (None, 1)
    assert parse_grid('data.domains=[["tweets"], ["tweets", "editorials"], null]').values == (
        ("tweets",), ("tweets", "editorials"), None)
    assert parse_grid("data.domains=tweets,editorials").values == (("tweets",), ("editorials",))
    assert parse_grid("cache_dir=/a,/b").values == (Path("/a"), Path("/b"))
    assert parse_grid("dpo.dpo.beta=[0.1, 1]").values == (0.1, 1.0)


@pytest.mark.parametrize("spec, message", [
    (KL, r"bad grid 'ppo.ppo.kl.init_kl_coef': expected PATH=V1,V2"),
    ("ppo.ppo.kl.init_kl_cof=0.1", r"unknown field 'init_kl_cof' in path "
                                   r"'ppo.ppo.kl.init_kl_cof'.*did you mean 'init_kl_coef'"),
    ("ppx.iterations=1", r"unknown field 'ppx'.*the top level has .*ppo"),
    ("ppo.ppo.kl=0.1", r"'ppo.ppo.kl' names a section \(KLController\), not a field; give one "
                       r"of its fields: ppo.ppo.kl.\{kind, init_kl_coef"),
    ("seed.x=1", r"'seed' is a field, not a section"),
    (f"{KL}=0.1,abc", rf"bad value 'abc' for {KL} \(type float\)"),
    ("ppo.iterations=2,1.5", r"bad value '1.5' for ppo.iterations \(type int\)"),
    ("ppo.ppo.kl.kind=fixed,bogus", r"bad value 'bogus' for ppo.ppo.kl.kind.*expected one of "
                                    r"\['fixed', 'adaptive'\]"),
    ("ppo.task_rewards=maybe", r"bad value 'maybe' for ppo.task_rewards.*true or false"),
    ("ppo.iterations=[2, true]", r"bad value True for ppo.iterations.*boolean"),
    (f"{KL}=0.1,,0.2", rf"grid {KL}: empty value"),
    (f"{KL}=", rf"grid axis {KL} has no values"),
    (f"{KL}=0.1,0.10", rf"grid axis {KL} repeats \[0.1\]"),
    ("data.domains=[1, 2", r"grid data.domains: bad JSON list"),
    ("policy.random_model.d_model=[[64]]", r"bad value \[64\] for policy.random_model.d_model"),
])
def test_bad_grids_name_the_path_and_value(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(spec)


def test_the_same_axis_twice_is_refused():
    with pytest.raises(ValueError, match=rf"grid axes \['{KL}'\] are given more than once"):
        SweepSpec(name="x", preset="tiny", grid=(f"{KL}=0.1", "ppo.ppo.kl.init-kl-coef=0.2")).axes


# ---- the plan and content addresses -------------------------------------------------------
def _plan(tmp_path, *grid, seeds=1, base=None, **spec):
    spec = SweepSpec(name="t", preset="tiny", grid=grid, seeds=seeds, **spec)
    return plan_sweep(spec, base or tiny(), tmp_path / "sweep")


def test_points_are_the_grid_product_times_the_seeds(tmp_path):
    base = dataclasses.replace(tiny(), seed=5)
    plan = _plan(tmp_path, f"{KL}=0.05,0.2", "dpo.dpo.beta=0.1,0.5,1", seeds=2, base=base)
    assert plan.seeds == (5, 6)
    assert len(plan.points) == 2 * 3 * 2
    got = [(p.index, p.values[KL], p.values["dpo.dpo.beta"], p.seed) for p in plan.points]
    assert got[:4] == [(0, 0.05, 0.1, 5), (1, 0.05, 0.1, 6), (2, 0.05, 0.5, 5), (3, 0.05, 0.5, 6)]
    assert got[-1] == (11, 0.2, 1.0, 6)
    for p in plan.points:
        assert p.cfg.ppo.ppo.kl.init_kl_coef == p.values[KL]
        assert p.cfg.dpo.dpo.beta == p.values["dpo.dpo.beta"] and p.cfg.seed == p.seed
        assert p.cfg.out_dir == p.run_dir and p.run_dir.parent == plan.out / "runs"
        assert p.cfg.sft == base.sft  # the rest is the base's
        assert plan.point(p.index) is p
    assert len({p.run_dir for p in plan.points}) == len(plan.points)
    assert plan.grid() == [{KL: k, "dpo.dpo.beta": b} for k in (0.05, 0.2) for b in (0.1, 0.5, 1.0)]
    with pytest.raises(IndexError,
                       match=r"--index 12 is out of range: the sweep has 12 points, 0..11"):
        plan.point(12)


def test_plans_that_cannot_run_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"sweep point 0 \(\{'ppo.ppo.kl.kind': 'fixed'\}, seed 0\)"
                                         r".*KLController\(kind='fixed'\) takes no target"):
        _plan(tmp_path, "ppo.ppo.kl.kind=fixed")  # tiny's adaptive controller has a target
    with pytest.raises(ValueError, match="seed is both the seed field and a grid axis"):
        _plan(tmp_path, "seed=1,2")
    with pytest.raises(ValueError, match="seed field data.margin is of type float"):
        _plan(tmp_path, f"{KL}=0.1", seed_field="data.margin")
    with pytest.raises(ValueError, match="a sweep always resumes"):
        _plan(tmp_path, f"{KL}=0.1", base=dataclasses.replace(tiny(), resume=False))
    with pytest.raises(ValueError, match="--force-restart does not apply"):
        _plan(tmp_path, f"{KL}=0.1", base=dataclasses.replace(tiny(), force_restart=("sft",)))
    with pytest.raises(ValueError, match=r"sweep tiny-kl overrides: unknown field 'nope'"):
        sweeps.base_config(dataclasses.replace(sweeps.get_sweep("tiny-kl"),
                                               overrides={"ppo.nope": 1}))


def test_stages_that_do_not_read_a_changed_field_keep_their_address(tmp_path):
    plan = _plan(tmp_path, f"{KL}=0.05,0.2", seeds=2)
    by = {(p.values[KL], p.seed): p.stages for p in plan.points}
    assert list(by[0.05, 0]) == ["sft", "rm", "ppo", "dpo"]
    for seed in (0, 1):  # a PPO field: one SFT, RM and DPO output per seed
        a, b = by[0.05, seed], by[0.2, seed]
        assert (a["sft"], a["rm"], a["dpo"]) == (b["sft"], b["rm"], b["dpo"])
        assert a["ppo"] != b["ppo"]
    # the seed is read by every stage: another seed is another output everywhere
    assert all(by[0.05, 0][s] != by[0.05, 1][s] for s in ("sft", "rm", "ppo", "dpo"))
    # an RM field moves the RM and what reads it (PPO), not SFT or DPO
    rm = {p.values["rm.steps"]: p.stages for p in _plan(tmp_path, "rm.steps=4,5").points}
    assert rm[4]["sft"] == rm[5]["sft"] and rm[4]["dpo"] == rm[5]["dpo"]
    assert rm[4]["rm"] != rm[5]["rm"] and rm[4]["ppo"] != rm[5]["ppo"]
    # an SFT field moves everything downstream of SFT
    sft = {p.values["sft.steps"]: p.stages for p in _plan(tmp_path, "sft.steps=4,5").points}
    assert all(sft[4][s] != sft[5][s] for s in ("sft", "rm", "ppo", "dpo"))
    # result-neutral fields (mesh, checkpoint cadence, name) move nothing, run directory included
    neutral = dataclasses.replace(tiny(), checkpoint_every=7, name="other",
                                  mesh=dataclasses.replace(tiny().mesh, fsdp=8))
    p0 = _plan(tmp_path, f"{KL}=0.05").points[0]
    p1 = _plan(tmp_path, f"{KL}=0.05", base=neutral).points[0]
    assert p0.stages == p1.stages and p0.run_dir == p1.run_dir
    # the address is the pipeline's, computed from the configuration alone
    assert by[0.05, 0]["rm"] == stage_identity(plan.points[0].cfg, "rm")


def test_rl_without_sft_or_reward_model_links_only_what_it_reads(tmp_path):
    base = dataclasses.replace(tiny(), stages=("ppo", "eval"), ppo=dataclasses.replace(
        tiny().ppo, init="initial", reward_model_weight=0.0,
        rewards=("tests._pipeline_rewards:length_bonus",)))
    assert list(_plan(tmp_path, f"{KL}=0.05", base=base).points[0].stages) == ["ppo"]
    dpo_only = dataclasses.replace(tiny(), stages=("dpo",))
    point = _plan(tmp_path, "dpo.dpo.beta=0.1", base=dpo_only).points[0]
    assert list(point.stages) == ["sft", "dpo"]


# ---- the table: mean ± s.e. over seeds ----------------------------------------------------
def _fake_summary(rng) -> dict:
    return {"sft": {"judge_mean": float(rng.normal()), "kl": 0.0},
            "ppo": {"judge_mean": float(rng.normal()), "kl": float(rng.uniform(0, 3)),
                    "rm_score": float(rng.normal())},
            "rm_heldout_accuracy": float(rng.uniform()), "baseline": "sft",
            "data": {"data/sft/kept": 100.0}}


def test_table_is_mean_and_standard_error_over_seeds(tmp_path):
    plan = plan_sweep(dataclasses.replace(sweeps.get_sweep("tiny-kl"), seeds=3),
                      sweeps.base_config(sweeps.get_sweep("tiny-kl")), tmp_path / "sweep")
    rng = np.random.default_rng(0)
    summaries = {}
    for p in plan.points:
        if p.index == 5:
            continue  # KL 0.2, seed 2: not finished
        p.run_dir.mkdir(parents=True)
        summaries[p.index] = _fake_summary(rng)
        (p.run_dir / "summary.json").write_text(json.dumps(summaries[p.index]))
        sweeps.mark_point_complete(p)
    # an older point_complete.json with other stage addresses does not count
    stale = plan.points[5]
    stale.run_dir.mkdir(parents=True)
    (stale.run_dir / "summary.json").write_text(json.dumps(_fake_summary(rng)))
    (stale.run_dir / sweeps.POINT_COMPLETE_FILE).write_text(json.dumps(
        {"stages": {"sft": "0" * 64}, "ran": list(stale.cfg.stages)}))

    cli.main(["sweep", "--sweep", "tiny-kl", "--seeds", "3", "--out", str(plan.out),
              "--report-only"])
    results = json.loads((plan.out / "results.json").read_text())
    assert results["axes"] == [KL] and results["seeds"] == [0, 1, 2]
    assert "sample standard deviation" in results["se"] and "ddof=1" in results["se"]
    rows = {r["values"][KL]: r for r in results["rows"]}
    assert rows[0.05]["n"] == 3 and rows[0.2]["n"] == 2 and rows[0.2]["seeds"] == [0, 1]
    for kl, indices in ((0.05, (0, 1, 2)), (0.2, (3, 4))):
        for name, get in (("ppo.judge_mean", lambda s: s["ppo"]["judge_mean"]),
                          ("ppo.kl", lambda s: s["ppo"]["kl"]),
                          ("rm_heldout_accuracy", lambda s: s["rm_heldout_accuracy"])):
            x = np.array([get(summaries[i]) for i in indices], np.float64)
            stat = rows[kl]["metrics"][name]
            assert stat["n"] == len(x) and stat["values"] == pytest.approx(x.tolist())
            assert stat["mean"] == pytest.approx(x.mean(), rel=1e-12)
            assert stat["se"] == pytest.approx(x.std(ddof=1) / math.sqrt(len(x)), rel=1e-12)
    assert "baseline" not in rows[0.05]["metrics"]  # not a number
    assert rows[0.05]["metrics"]["data.data/sft/kept"]["se"] == 0.0
    assert results["missing"] == [{"index": 5, "values": {KL: 0.2}, "seed": 2,
                                   "dir": os.path.relpath(stale.run_dir, plan.out)}]

    md = (plan.out / "results.md").read_text()
    assert "sample standard deviation over seeds (ddof=1) / sqrt(n)" in md
    judge = rows[0.2]["metrics"]["ppo.judge_mean"]
    cell = f"{judge['mean']:.4g} ± {judge['se']:.2g}"
    assert re.search(rf"^\| 0\.2 \| 2 \| .*{re.escape(cell)}", md, re.M), md
    assert "## Not finished" in md and "5 of 6 runs finished" in md
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(Path(i).name for i in images) == [f"ppo.judge_mean_vs_{KL}.png",
                                                    f"ppo.kl_vs_{KL}.png"]
    for rel in images:
        assert (plan.out / rel).read_bytes()[:8] == PNG_MAGIC

    # one seed: a mean and no s.e.
    one = {"values": {KL: 0.1}, "seed": 0, "dir": "r", "summary": {"a": 2.5}}
    table = report.build_sweep_table("one", [KL], [{KL: 0.1}], [one])
    stat = table.rows[0].metrics["a"]
    assert (stat.mean, stat.se, stat.n) == (2.5, None, 1)
    assert report.format_mean_se(stat) == "2.5 (n=1)"
    with pytest.raises(ValueError, match="not a point of the grid"):
        report.build_sweep_table("x", [KL], [{KL: 0.1}],
                                 [{"values": {KL: 0.3}, "seed": 0, "dir": "r", "summary": {}}])


def test_plot_kinds_are_a_registry(tmp_path):
    calls = []

    @report.register_sweep_plot("test-frontier")
    def frontier(table, plots_dir, *, x, y):
        calls.append((table.name, x, y))
        png = plots_dir / "frontier.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(PNG_MAGIC)
        return [report.SweepFigure(png, "Which KL buys the most reward?")]

    try:
        with pytest.raises(ValueError, match="already registered"):
            report.register_sweep_plot("test-frontier")(frontier)
        table = report.build_sweep_table("s", [KL], [{KL: 0.1}, {KL: 0.2}], [
            {"values": {KL: v}, "seed": 0, "dir": f"r{v}", "summary": {"ppo": {"kl": v}}}
            for v in (0.1, 0.2)])
        md = report.write_sweep_report(tmp_path, table, title="s", plots=[
            ("test-frontier", {"x": "ppo.kl", "y": "ppo.judge_mean"}),
            ("metric_vs_axis", {"metric": "ppo.nothing"})]).read_text()
        assert calls == [("s", "ppo.kl", "ppo.judge_mean")]
        assert "![Which KL buys the most reward?](plots/frontier.png)" in md
        assert "Not drawn: metric_vs_axis" in md and "ppo.nothing" in md  # noted, not fatal
        with pytest.raises(KeyError, match="unknown sweep plot 'nope'"):
            report.write_sweep_report(tmp_path, table, title="s", plots=[("nope", {})])
    finally:
        report._SWEEP_PLOTS.pop("test-frontier", None)


# ---- the command line ---------------------------------------------------------------------
def test_named_sweep_with_overrides(tmp_path):
    args = cli.parse_sweep_args(["--sweep", "tiny-kl", "--seeds", "3", "--ppo.iterations", "5",
                                 "--grid", "dpo.dpo.beta=0.1,0.2", "--out", str(tmp_path),
                                 "--index", "4", "--index", "1"])
    plan = args.plan
    assert args.indices == (4, 1) and not args.list and not args.report_only
    assert [a.path for a in plan.axes] == [KL, "dpo.dpo.beta"] and plan.seeds == (0, 1, 2)
    assert len(plan.points) == 12 and plan.out == tmp_path
    cfg = plan.points[0].cfg
    assert cfg.ppo.iterations == 5 and cfg.ppo.ppo.kl.kind == "fixed"  # CLI and sweep overrides
    assert cfg.eval.num_samples == 1 and cfg.sft == tiny().sft
    # --out-dir (what tpu_scripts/launch.sh passes) is the sweep directory too; a grid
    # replaces the named sweep's axis of the same path
    args = cli.parse_sweep_args(["--sweep", "tiny-kl", "--out-dir", str(tmp_path / "o"),
                                 "--grid", f"{KL}=1", "--seeds", "1"])
    assert args.plan.out == tmp_path / "o" and [p.values[KL] for p in args.plan.points] == [1.0]
    adhoc = cli.parse_sweep_args(["--preset", "tiny", "--grid", "rm.steps=2,3"]).plan
    assert adhoc.spec.name == "tiny" and adhoc.out == Path("runs/sweeps/tiny")


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--grid", "ppo.ppo.kl.nope=1"], r"rlhf-jax sweep: unknown field 'nope'"),
    (["--preset", "tiny", "--grid", "ppo.iterations=x"], r"bad value 'x' for ppo.iterations"),
    (["--sweep", "nope"], r"unknown sweep 'nope'; known sweeps: \[.*'tiny-kl'"),
    (["--preset", "nope"], r"unknown preset 'nope'"),
    (["--sweep", "tiny-kl", "--index", "4"], r"--index 4 is out of range: the sweep has 4 points"),
    (["--sweep", "tiny-kl", "--seeds", "x"], r"bad arguments"),
])
def test_bad_sweep_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.parse_sweep_args(argv)


def test_list_and_help(tmp_path, capsys):
    cli.main(["sweep", "--sweep", "tiny-kl", "--out", str(tmp_path), "--list"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["index", KL, "seed"]
    assert [ln.split()[:4] for ln in lines[1:]] == [
        ["0", "0.05", "0", "-"], ["1", "0.05", "1", "-"], ["2", "0.2", "0", "-"],
        ["3", "0.2", "1", "-"]]
    assert not tmp_path.joinpath("runs").exists()  # --list writes nothing
    with pytest.raises(SystemExit) as info:
        cli.main(["sweep", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhf-jax sweep") and "tiny-kl" in out and "sqrt(n)" in out
    cli.main([])
    assert re.search(r"^  sweep +\S", capsys.readouterr().out, re.M)


def test_launch_forwards_the_sweep_and_the_index(failing_gcloud):  # noqa: F811
    env, marker = failing_gcloud
    env = _dry_env(env, NUM_WORKERS="1", OUT_DIR="/mnt/shared/kl")
    res = _run([BASH, str(TPU_DIR / "launch.sh"), "--sweep", "tiny-kl", "--index", "3"], env)
    assert res.returncode == 0, res.stderr
    assert ("run_with_resubmit 3 .venv/bin/rlhf-jax sweep --sweep tiny-kl --index 3 --name r1 "
            "--out-dir \"$OUT\"") in res.stdout
    res = _run([BASH, str(TPU_DIR / "launch.sh"), "--command", "sweep", "--preset", "tiny",
                "--index", "0", "--", "--grid", "rm.steps=2,3", "--seeds", "2"], env)
    assert res.returncode == 0, res.stderr
    assert ("rlhf-jax sweep --preset tiny --index 0 --name r1 --grid rm.steps=2\\\\,3 --seeds 2 "
            "--out-dir") in res.stdout
    res = _run([BASH, str(TPU_DIR / "launch.sh"), "--index", "1"], env)
    assert res.returncode == 1 and "--index applies to --command sweep only" in res.stderr
    res = _run([BASH, str(TPU_DIR / "launch.sh"), "--sweep", "tiny-kl", "--index", "x"], env)
    assert res.returncode == 1 and "--index must be a number" in res.stderr
    assert not marker.exists()


# ---- locks --------------------------------------------------------------------------------
def test_a_lock_can_wait_for_its_holder(tmp_path):
    with RunLock(tmp_path, process_index=0):  # flock: another open file is another holder
        t0 = time.monotonic()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path, process_index=0, timeout=0.4, poll=0.1).acquire()
        assert 0.35 < time.monotonic() - t0 < 5
    holder = RunLock(tmp_path, process_index=0).acquire()
    threading.Timer(0.5, holder.release).start()
    t0 = time.monotonic()
    with RunLock(tmp_path, process_index=0, timeout=None, poll=0.05) as waiter:
        assert waiter.locked and time.monotonic() - t0 >= 0.45


def test_a_point_another_process_runs_is_skipped(tmp_path):
    plan = _plan(tmp_path, f"{KL}=0.05,0.2")
    with RunLock(plan.points[0].run_dir, process_index=0):
        result = sweeps.run_sweep(plan, [0])
    assert result.status == {0: "busy"} and result.exit_code == 0
    assert not sweeps.point_complete(plan, plan.points[0])
    assert os.readlink(plan.points[0].run_dir / "sft") == "../../stages/sft-" + \
        plan.points[0].stages["sft"][:16]
    assert json.loads((plan.out / "results.json").read_text())["missing"][0]["index"] == 0


# ---- a real sweep: --index, kill, resume, shared stages -----------------------------------
def _args(out: Path) -> list[str]:
    cfg = tiny_config(out)  # the test mesh and asset cache of tests/test_pipeline.py
    mesh = ["--mesh.data", str(cfg.mesh.data), "--mesh.fsdp", str(cfg.mesh.fsdp)]
    cache = ["--cache-dir", str(cfg.cache_dir)] if cfg.cache_dir else []
    return ["sweep", "--preset", "tiny", "--grid", f"{KL}=0.05,0.2", "--seeds", "1",
            "--out", str(out), "--stages", "sft", "rm", "ppo", "eval",
            "--data.max-words", str(cfg.data.max_words), "--eval.num-samples", "1", *mesh, *cache]


def _sigterm_after_first_ppo_iteration(make):
    def wrapped(*args, **kwargs):
        iteration = make(*args, **kwargs)
        calls = []

        def iteration_then_sigterm(*a):
            out = iteration(*a)
            calls.append(1)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        return iteration_then_sigterm
    return wrapped


class _ReleaseWhenWaiting(logging.Handler):
    """Releases ``lock`` one second after a waiter logs that it waits (at the latest after two
    minutes, so a failing test cannot hang)."""

    def __init__(self, lock: RunLock):
        super().__init__(logging.INFO)
        self.fallback = threading.Timer(120.0, lock.release)
        self.fallback.start()
        self.run_lock = lock  # (``self.lock`` is the handler's own)

    def emit(self, record):
        if "waiting for it to finish" in record.getMessage():
            threading.Timer(1.0, self.run_lock.release).start()


@dataclasses.dataclass
class SweepRuns:
    plan: sweeps.SweepPlan
    trained: list[list[str]]  # per invocation: the stages whose training loop ran, in order
    logs: list[list[str]]
    codes: list[int]
    times: list[float]


def _main(argv, trained, logs, codes, times) -> None:
    handler = _Messages()
    logger = logging.getLogger("rlhf_jax")
    logger.addHandler(handler)
    t0 = time.perf_counter()
    try:
        cli.main(argv)
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code)
    finally:
        logger.removeHandler(handler)
        logs.append(handler.messages)
        times.append(time.perf_counter() - t0)


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory) -> SweepRuns:
    out = tmp_path_factory.mktemp("sweep") / "kl"
    argv = _args(out)
    plan = cli.parse_sweep_args(argv[1:]).plan
    trained, logs, codes, times = [], [], [], []
    original = run_module.run_loop

    def run(argv, *, sigterm=False, hold=None):
        seen = []
        trained.append(seen)

        def count(**kwargs):
            seen.append(kwargs["stage"])
            return original(**kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(run_module, "run_loop", count)
            if sigterm:
                mp.setattr(stages_module, "make_ppo_iteration",
                           _sigterm_after_first_ppo_iteration(stages_module.make_ppo_iteration))
            if hold is not None:  # "another process" trains this stage until the sweep waits
                lock = RunLock(hold, process_index=0).acquire()
                release = _ReleaseWhenWaiting(lock)
                logging.getLogger("rlhf_jax.pipeline.lock").addHandler(release)
            try:
                _main(argv, trained=trained, logs=logs, codes=codes, times=times)
            finally:
                if hold is not None:
                    logging.getLogger("rlhf_jax.pipeline.lock").removeHandler(release)
                    release.fallback.cancel()
                    lock.release()

    run(argv + ["--index", "1"])  # 0: point 1 alone
    run(argv, sigterm=True)  # 1: point 0's PPO, killed after its first iteration
    p0 = plan.points[0]
    run(argv, hold=plan.stage_dir("ppo", p0.stages["ppo"]))  # 2: resume, waiting for the lock
    run(argv)  # 3: nothing left to do
    return SweepRuns(plan=plan, trained=trained, logs=logs, codes=codes, times=times)


def test_index_runs_one_point(sweep_runs):
    p1 = sweep_runs.plan.points[1]
    assert sweep_runs.codes[0] == 0
    assert sweep_runs.trained[0] == ["sft", "rm", "ppo"]
    log = sweep_runs.logs[0]
    assert not any("point 0 " in m for m in log)
    assert any(m.startswith("sweep: point 1 of 2 (init_kl_coef=0.2, seed=0)") for m in log)
    point = json.loads((p1.run_dir / sweeps.POINT_FILE).read_text())
    assert point["index"] == 1 and point["values"] == {KL: 0.2} and point["seed"] == 0
    assert point["stages"] == {s: f"stages/{s}-{a[:16]}" for s, a in p1.stages.items()}


def test_a_killed_sweep_exits_75_and_keeps_the_checkpoint(sweep_runs):
    p0, p1 = sweep_runs.plan.points
    assert sweep_runs.codes[1] == EXIT_PREEMPTED
    assert sweep_runs.trained[1] == ["ppo"]  # SFT and RM are point 1's
    log = sweep_runs.logs[1]
    assert any(m.startswith("sweep: point 0 of 2") for m in log)  # point 1 is never reached
    for stage in ("sft", "rm"):
        assert any(m.startswith(f"{stage}: already finished in {p0.run_dir / stage}") for m in log)
    assert any("ppo: stopped by SIGTERM at step 1" in m for m in log), log


def test_the_resumed_sweep_waits_for_the_stage_lock_and_continues(sweep_runs):
    p0, p1 = sweep_runs.plan.points
    log = sweep_runs.logs[2]
    assert sweep_runs.codes[2] == 0
    assert sweep_runs.trained[2] == ["ppo"]
    assert any(m.startswith("sweep: point 1 (init_kl_coef=0.2, seed=0) already finished")
               for m in log)
    ppo_dir = sweep_runs.plan.stage_dir("ppo", p0.stages["ppo"]).resolve()
    assert any(m.startswith(f"{ppo_dir} is in use by host") and "waiting" in m for m in log), log
    assert sweep_runs.times[2] > 1.0
    assert "ppo: resumed from step 1" in log
    rows = read_jsonl(p0.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["stage"] == "ppo"] == [1, 2]  # each iteration once
    # a finished sweep trains nothing
    assert sweep_runs.codes[3] == 0 and sweep_runs.trained[3] == []
    assert sum(m.endswith("already finished in " + str(p.run_dir)) for m in sweep_runs.logs[3]
               for p in (p0, p1)) == 2


def test_points_share_the_upstream_stage_outputs(sweep_runs):
    plan, (p0, p1) = sweep_runs.plan, sweep_runs.plan.points
    everything = [s for t in sweep_runs.trained for s in t]
    assert everything.count("sft") == 1 and everything.count("rm") == 1  # trained once
    assert everything.count("ppo") == 3  # point 1; point 0 killed, then resumed
    for stage in ("sft", "rm"):
        assert (p0.run_dir / stage).resolve() == (p1.run_dir / stage).resolve()
        assert (p0.run_dir / stage).is_symlink()
    assert (p0.run_dir / "ppo").resolve() != (p1.run_dir / "ppo").resolve()
    assert sorted(d.name.split("-")[0] for d in (plan.out / "stages").iterdir()) == [
        "ppo", "ppo", "rm", "sft"]
    for p in (p0, p1):
        assert sweeps.point_complete(plan, p)
        for stage, address in p.stages.items():
            d = plan.stage_dir(stage, address)
            assert (d / "final" / "COMPLETE.json").exists()
            assert json.loads((d / sweeps.ADDRESS_FILE).read_text())["identity"] == address
        summary = json.loads((p.run_dir / "summary.json").read_text())
        assert set(summary) >= {"sft", "ppo", "rm_heldout_accuracy"}
    # the shared RM's record is the pipeline's: it read the shared SFT
    rm_dir, sft_dir = (plan.stage_dir(s, p0.stages[s]) for s in ("rm", "sft"))
    rm_record = json.loads((rm_dir / "stage.json").read_text())
    sft_done = json.loads((sft_dir / "final" / "COMPLETE.json").read_text())
    assert rm_record["inputs"] == {"sft": sft_done["fingerprint"]}


def test_the_table_and_report_only(sweep_runs, capsys):
    plan, (p0, p1) = sweep_runs.plan, sweep_runs.plan.points
    results = json.loads((plan.out / "results.json").read_text())
    assert [r["values"] for r in results["rows"]] == [{KL: 0.05}, {KL: 0.2}]
    assert results["missing"] == []
    for row, p in zip(results["rows"], (p0, p1)):
        summary = json.loads((p.run_dir / "summary.json").read_text())
        stat = row["metrics"]["ppo.judge_mean"]
        assert (stat["n"], stat["se"], stat["mean"]) == (1, None, summary["ppo"]["judge_mean"])
        assert row["runs"] == [os.path.relpath(p.run_dir, plan.out)]
    md = (plan.out / "results.md").read_text()
    assert "2 of 2 runs finished" in md and "## All summary numbers" in md
    for png in (plan.out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    before = (plan.out / "results.json").read_text()
    (plan.out / "results.json").unlink()
    cli.main(_args(plan.out) + ["--report-only"])
    assert (plan.out / "results.json").read_text() == before
    assert capsys.readouterr().out.strip() == f"results: {plan.out / 'results.md'}"
    cli.main(_args(plan.out) + ["--list"])
    listed = capsys.readouterr().out.splitlines()[1:]
    assert [ln.split()[3] for ln in listed] == ["done", "done"]
    assert all(re.search(r"sft-\w{8}\* rm-\w{8}\* ppo-\w{8}\*", ln) for ln in listed)
