"""Sweeps with arms, the reward-hacking sweeps and their figures, without training.

* arms (``rlhf_jax.sweeps.SweepArm``): a sweep's points are the union over its arms (each
  times the grid and the seeds), not a product; bad arms are refused naming the arm;
* the named sweeps ``sentiment-overoptimization`` (single reward model, ensemble, refresh)
  and ``sentiment-frontier`` (PPO at fixed KL / adaptive KL targets, DPO at several β) plan
  the expected arms, seeds and shared stage outputs, within their time budget. An arm that
  sets a field this version of the library lacks is skipped with the field's name;
* the ``overoptimization`` plot on fabricated probe records: the mean curve at equal steps,
  the peak found and annotated where it is, the per-arm table (per-seed peaks, mean ± s.e.,
  final proxy, proxy still rising after the gold peak) against a hand computation;
* the ``frontier`` plot on fabricated summaries and configurations: one point per setting,
  mean ± s.e. over seeds, families and labels from the runs' configurations;
* ``data.max_preferences``: a seeded random slice of the training comparisons only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import plots, report, sweeps
from rlhf_jax.pipeline.config import DataConfig
from rlhf_jax.presets import tiny
from rlhf_jax.sweeps import ARM_AXIS, SweepArm, SweepSpec, plan_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KL = "ppo.ppo.kl.init_kl_coef"


# ---- arms: a union of settings ---------------------------------------------------------------
def _arms_spec(**kw) -> SweepSpec:
    return SweepSpec(name="u", preset="tiny", seeds=2, arms=(
        SweepArm("ppo-kl0.05", {"stages": ("sft", "rm", "ppo", "eval"), KL: 0.05}),
        SweepArm("dpo-beta0.5", {"stages": ["sft", "dpo", "eval"], "dpo.dpo.beta": "0.5"})), **kw)


def test_arms_are_a_union_not_a_product(tmp_path):
    plan = plan_sweep(_arms_spec(), tiny(), tmp_path / "s")
    assert plan.axis_names == (ARM_AXIS,)
    assert [(p.values, p.seed) for p in plan.points] == [
        ({"arm": "ppo-kl0.05"}, 0), ({"arm": "ppo-kl0.05"}, 1),
        ({"arm": "dpo-beta0.5"}, 0), ({"arm": "dpo-beta0.5"}, 1)]
    ppo, dpo = plan.points[0], plan.points[2]
    assert ppo.cfg.stages == ("sft", "rm", "ppo", "eval")
    assert ppo.cfg.ppo.ppo.kl.init_kl_coef == 0.05
    assert dpo.cfg.stages == ("sft", "dpo", "eval") and dpo.cfg.dpo.dpo.beta == 0.5  # converted
    assert dpo.cfg.ppo == tiny().ppo  # the other arm's overrides do not leak
    assert list(ppo.stages) == ["sft", "rm", "ppo"] and list(dpo.stages) == ["sft", "dpo"]
    assert ppo.stages["sft"] == dpo.stages["sft"]  # one SFT per seed for every arm
    assert ppo.run_dir.name.startswith("ppo-kl0.05_seed=0-")
    assert ppo.label == "arm=ppo-kl0.05, seed=0"
    assert plan.grid() == [{"arm": "ppo-kl0.05"}, {"arm": "dpo-beta0.5"}]
    # arms x grid: the grid's product within each arm
    plan = plan_sweep(dataclasses.replace(_arms_spec(), grid=("rm.steps=4,5",), seeds=1),
                      tiny(), tmp_path / "g")
    assert [(p.values["arm"], p.values["rm.steps"]) for p in plan.points] == [
        ("ppo-kl0.05", 4), ("ppo-kl0.05", 5), ("dpo-beta0.5", 4), ("dpo-beta0.5", 5)]
    assert plan.axis_names == (ARM_AXIS, "rm.steps")
    listed = sweeps.list_points(plan).splitlines()
    assert listed[0].split()[:4] == ["index", "arm", "rm.steps", "seed"]
    assert listed[3].split()[:4] == ["2", "dpo-beta0.5", "4", "0"]
    saved = sweeps.plan_json(plan)
    assert [a["name"] for a in saved["arms"]] == ["ppo-kl0.05", "dpo-beta0.5"]


def test_bad_arms_are_refused_naming_the_arm(tmp_path):
    with pytest.raises(ValueError, match=r"arm names \['a'\] are given more than once"):
        SweepSpec(name="x", preset="tiny", arms=(SweepArm("a"), SweepArm("a")))
    with pytest.raises(ValueError, match=r"arm names \['a b'\] must be"):
        SweepSpec(name="x", preset="tiny", arms=(SweepArm("a b"),))
    bad = SweepSpec(name="x", preset="tiny", arms=(SweepArm("ok"), SweepArm("new", {
        "ppo.not_yet_a_field": 3})))
    with pytest.raises(ValueError, match=r"sweep x, arm 'new': unknown field 'not_yet_a_field'"):
        plan_sweep(bad, tiny(), tmp_path)
    clash = SweepSpec(name="x", preset="tiny", grid=(f"{KL}=0.1",),
                      arms=(SweepArm("k", {KL: 0.2}),))
    with pytest.raises(ValueError, match=rf"arm 'k' sets \['{KL}'\], which the grid or the seeds"):
        plan_sweep(clash, tiny(), tmp_path)
    with pytest.raises(ValueError,
                       match=r"sweep point 0 \(\{'arm': 'f'\}, seed 0\).*takes no target"):
        plan_sweep(SweepSpec(name="x", preset="tiny", arms=(
            SweepArm("f", {"ppo.ppo.kl.kind": "fixed"}),)), tiny(), tmp_path)


def test_a_table_of_arms_has_one_row_per_arm(tmp_path):
    plan = plan_sweep(_arms_spec(), tiny(), tmp_path / "s")
    for p in plan.points[:3]:  # the DPO arm's seed 1 is not finished
        p.run_dir.mkdir(parents=True)
        (p.run_dir / "summary.json").write_text(json.dumps({"sft": {"judge_mean": 0.1 + p.seed}}))
        sweeps.mark_point_complete(p)
    table = sweeps.collect_table(plan)
    assert table.axes == (ARM_AXIS,)
    assert [(r.label, r.seeds) for r in table.rows] == [("ppo-kl0.05", (0, 1)),
                                                        ("dpo-beta0.5", (0,))]
    assert table.rows[0].metrics["sft.judge_mean"].mean == pytest.approx(0.6)
    assert [m["values"] for m in table.missing] == [{"arm": "dpo-beta0.5"}]


# ---- the named sweeps ------------------------------------------------------------------------
def _missing_fields(spec: SweepSpec) -> list[str]:
    missing = []
    for arm in spec.arms:
        for path in arm.overrides:
            try:
                sweeps.resolve_field(path)
            except ValueError:
                missing.append(path)
    return missing


def _skip_missing(spec: SweepSpec) -> None:
    missing = _missing_fields(spec)
    if missing:
        pytest.skip(f"sweep {spec.name}: fields not in this version of the library yet: "
                    f"{', '.join(missing)}")


def _plan_or_skip(spec: SweepSpec, out: Path) -> sweeps.SweepPlan:
    _skip_missing(spec)
    return plan_sweep(spec, sweeps.base_config(spec), out)


def _budget_seconds(doc: str) -> int:
    found = re.search(r"total\b.*?(\d+) = (\d+) min", doc, re.S)
    assert found, "the sweep's docstring states its total time"
    seconds, minutes = int(found.group(1)), int(found.group(2))
    assert minutes == round(seconds / 60)
    return seconds


def test_overoptimization_sweep_lists_its_three_arms():
    spec = sweeps.get_sweep("sentiment-overoptimization")
    assert spec.preset == "smollm2-sentiment" and spec.seeds >= 2
    assert [a.name for a in spec.arms] == ["single", "ensemble", "refresh"]
    arms = {a.name: dict(a.overrides) for a in spec.arms}
    assert arms["single"] == {}
    assert arms["ensemble"]["rm.ensemble"] == 3
    assert arms["ensemble"]["ppo.reward_aggregation"] == "mean_minus_std"
    assert arms["ensemble"]["ppo.reward_uncertainty_coef"] > 0
    assert arms["refresh"]["ppo.refresh_every"] == 10
    assert {"ppo.refresh_pairs", "ppo.refresh_steps"} <= set(arms["refresh"])
    assert [p.kind for p in spec.plots] == ["overoptimization"]
    assert _budget_seconds(sweeps.sentiment_overoptimization.__doc__) <= 3600
    base = sweeps.base_config(spec)  # the common settings use fields that exist
    assert base.stages == ("sft", "rm", "ppo")
    assert base.data.max_preferences == 64 and base.rm.steps == 16
    assert base.ppo.probe_every == 5 and base.ppo.iterations == 30 and base.ppo.batch_size == 16
    assert base.ppo.ppo.kl.kind == "fixed" and base.ppo.ppo.kl.init_kl_coef == 0.0
    assert base.ppo.ppo.sampling.min_new_tokens == 0


def test_overoptimization_sweep_plan(tmp_path):
    """The arms whose fields exist are planned and checked; the test then skips, naming the
    fields still missing, until every arm can be planned."""
    spec = sweeps.get_sweep("sentiment-overoptimization")
    ready = tuple(a for a in spec.arms if not _missing_fields(dataclasses.replace(spec, arms=(a,))))
    names = [a.name for a in ready]
    plan = plan_sweep(dataclasses.replace(spec, arms=ready), sweeps.base_config(spec), tmp_path)
    assert [(p.values["arm"], p.seed) for p in plan.points] == [
        (a, s) for a in names for s in (0, 1)]
    by = {(p.values["arm"], p.seed): p for p in plan.points}
    for seed in (0, 1):
        single = by["single", seed]
        assert list(single.stages) == ["sft", "rm", "ppo"]
        assert single.cfg.rm.ensemble is None and single.cfg.ppo.probe_every == 5
        if "ensemble" in names:
            ens = by["ensemble", seed]
            assert single.stages["sft"] == ens.stages["sft"]  # one SFT per seed
            assert single.stages["rm"] != ens.stages["rm"] and ens.cfg.rm.ensemble == 3
            assert single.stages["ppo"] != ens.stages["ppo"]
        if "refresh" in names:
            ref = by["refresh", seed]
            assert single.stages["sft"] == ref.stages["sft"]
            assert single.stages["rm"] == ref.stages["rm"]  # refreshing starts from the same RM
            assert single.stages["ppo"] != ref.stages["ppo"] and ref.cfg.ppo.refresh_every == 10
            assert single.cfg.ppo.refresh_every is None
    _skip_missing(spec)
    assert names == ["single", "ensemble", "refresh"]


def test_frontier_sweep_plan(tmp_path):
    spec = sweeps.get_sweep("sentiment-frontier")
    assert _budget_seconds(sweeps.sentiment_frontier.__doc__) <= 3600
    assert [p.kind for p in spec.plots] == ["frontier"]
    plan = _plan_or_skip(spec, tmp_path)
    names = [a.name for a in spec.arms]
    assert names == ["ppo-kl0.01", "ppo-kl0.05", "ppo-kl0.2", "ppo-target2", "ppo-target5",
                     "dpo-beta0.05", "dpo-beta0.1", "dpo-beta0.3"]
    assert len(plan.points) == len(names) * 2 and plan.seeds == (0, 1)
    for seed in (0, 1):
        points = [p for p in plan.points if p.seed == seed]
        assert len({p.stages["sft"] for p in points}) == 1  # one SFT per seed
        ppo = [p for p in points if p.values["arm"].startswith("ppo")]
        dpo = [p for p in points if p.values["arm"].startswith("dpo")]
        assert len({p.stages["rm"] for p in ppo}) == 1 and len({p.stages["ppo"] for p in ppo}) == 5
        assert all(list(p.stages) == ["sft", "rm", "ppo"] and "eval" in p.cfg.stages
                   and "dpo" not in p.cfg.stages for p in ppo)
        assert all(list(p.stages) == ["sft", "dpo"] and p.cfg.stages == ("sft", "dpo", "eval")
                   for p in dpo)
        kl = {p.values["arm"]: p.cfg.ppo.ppo.kl for p in ppo}
        assert kl["ppo-kl0.2"].kind == "fixed" and kl["ppo-kl0.2"].init_kl_coef == 0.2
        assert kl["ppo-target5"].kind == "adaptive" and kl["ppo-target5"].target == 5.0
        assert sorted(p.cfg.dpo.dpo.beta for p in dpo) == [0.05, 0.1, 0.3]


# ---- the overoptimization plot ---------------------------------------------------------------
STEPS = [0, 5, 10, 15, 20]
#: (kl, gold, proxy) per probe step of three fabricated runs
RUNS = {
    ("single", 0): ([0, 1, 4, 9, 16], [0.1, 0.3, 0.5, 0.4, 0.2], [0.0, 0.5, 1.0, 1.5, 2.0]),
    ("single", 1): ([0, 1.44, 4.84, 10.24, 17.64], [0.1, 0.35, 0.3, 0.45, 0.25],
                    [0.0, 0.4, 0.9, 1.3, 1.2]),
    ("refresh", 0): ([0, 0.25, 1, 2.25, 4], [0.1, 0.2, 0.3, 0.4, 0.5], [0.0, 0.1, 0.2, 0.3, 0.4]),
}


def _records(arm: str, seed: int) -> list[dict]:
    kl, gold, proxy = RUNS[arm, seed]
    recs = [{"step": s, "stage": "ppo_eval", "probe/kl": k, "probe/sqrt_kl": math.sqrt(k),
             "gold/score": g, "proxy/score": p} for s, k, g, p in zip(STEPS, kl, gold, proxy)]
    # noise that must be ignored: other stages' records, and a stale probe row that a resumed
    # run logged again (the last record of a step counts)
    stale = dict(recs[1], **{"gold/score": 9.0})
    return [{"step": 1, "stage": "ppo", "probe/kl": 5.0, "gold/score": 7.0}, stale, *recs]


def _fake_sweep(tmp_path: Path, runs, summaries=None, configs=None) -> report.SweepTable:
    arms = list(dict.fromkeys(a for a, _ in runs))
    grid = [{"arm": a} for a in arms]
    table_runs = []
    for arm, seed in runs:
        rel = f"runs/{arm}_seed={seed}"
        (tmp_path / rel).mkdir(parents=True)
        if (arm, seed) in RUNS:
            lines = [json.dumps(r) for r in _records(arm, seed)]
            (tmp_path / rel / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        if configs and arm in configs:
            (tmp_path / rel / "config.json").write_text(json.dumps(configs[arm]))
        table_runs.append({"values": {"arm": arm}, "seed": seed, "dir": rel,
                           "summary": (summaries or {}).get((arm, seed), {})})
    return report.build_sweep_table("fake", ["arm"], grid, table_runs)


def test_probe_curves_and_their_mean_at_equal_steps():
    c = plots.probe_curve(_records("single", 1), seed=1)
    assert c.steps.tolist() == STEPS and c.seed == 1
    assert c.gold.tolist() == RUNS["single", 1][1]  # the stale and the "ppo" rows are ignored
    assert plots.probe_curve([{"step": 0, "stage": "ppo", "probe/kl": 1.0}]) is None
    no_sqrt = plots.probe_curve([{"step": 0, "stage": "ppo_eval", "probe/kl": 2.25}])
    assert no_sqrt.sqrt_kl.tolist() == [1.5] and np.isnan(no_sqrt.gold).all()
    arm = plots.gold_proxy_arm("single", [plots.probe_curve(_records("single", s), seed=s)
                                          for s in (0, 1)])
    gold = (np.array(RUNS["single", 0][1]) + np.array(RUNS["single", 1][1])) / 2
    np.testing.assert_allclose(arm.gold, gold)  # [0.1, 0.325, 0.4, 0.425, 0.225]
    np.testing.assert_allclose(arm.sqrt_kl, [0, 1.1, 2.1, 3.1, 4.1])
    assert arm.peak == 3 and arm.steps[arm.peak] == 15
    # a seed with fewer probes: the mean is taken at the steps every seed has
    short = plots.probe_curve(_records("single", 0)[:4], seed=0)  # steps 0, 5
    assert plots.gold_proxy_arm("x", [short, arm.runs[1]]).steps.tolist() == [0, 5]


def test_the_peak_is_marked_and_annotated_where_it_is():
    arms = [plots.gold_proxy_arm(a, [plots.probe_curve(_records(a, s), seed=s) for s in seeds])
            for a, seeds in (("single", (0, 1)), ("refresh", (0,)))]
    fig = plots.overoptimization_figure(arms, gold_name="VADER")
    gold_ax, proxy_ax = fig.axes
    notes = {t.get_gid(): t for t in gold_ax.texts}
    single = notes["peak:single"]
    assert single.xy == pytest.approx((3.1, 0.425))  # the mean curve's peak (step 15)
    assert "KL 9.62 nats" in single.get_text() and "+0.425" in single.get_text()
    assert notes["peak:refresh"].xy == pytest.approx((2.0, 0.5))  # still rising: last probe
    stars = [ln for ln in gold_ax.get_lines() if ln.get_marker() == "*"]
    assert [v for ln in stars for v in (ln.get_xdata()[0], ln.get_ydata()[0])] == \
        pytest.approx([3.1, 0.425, 2.0, 0.5])
    # per arm: one thin line per seed and one thick mean line in each panel, and the proxy
    # panel shares the gold panel's x axis
    thick = [ln for ln in proxy_ax.get_lines() if ln.get_linewidth() > 2]
    assert len(thick) == 2 and len(proxy_ax.get_lines()) - len(thick) == 3 + 2  # + 2 dotted
    assert gold_ax.get_shared_x_axes().joined(gold_ax, proxy_ax)
    assert "sqrt(nats)" in gold_ax.get_xlabel()


def test_overoptimization_table_against_a_hand_computation(tmp_path):
    table = _fake_sweep(tmp_path, [("single", 0), ("single", 1), ("refresh", 0),
                                   ("ensemble", 0)])  # ensemble: finished, no probe records
    md = report.write_sweep_report(tmp_path, table, title="fake", plots=[
        ("overoptimization", {"gold_name": "VADER compound score"})]).read_text()
    assert (tmp_path / "plots" / "overoptimization.png").read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((tmp_path / "overoptimization.json").read_text())
    assert saved["without_probe"] == ["runs/ensemble_seed=0"]
    rows = {r["arm"]: r for r in saved["arms"]}
    assert list(rows) == ["single", "refresh"]
    single = rows["single"]
    # per seed: peak gold 0.5 at step 10 (KL 4) and 0.45 at step 15 (KL 10.24)
    assert [(s["peak_step"], s["peak_gold"], s["peak_kl"]) for s in single["seeds"]] == [
        (10, 0.5, 4.0), (15, 0.45, 10.24)]
    hand = {"peak_gold": [0.5, 0.45], "peak_kl": [4.0, 10.24], "final_proxy": [2.0, 1.2]}
    for key, x in ((k, np.array(v)) for k, v in hand.items()):
        assert single[key]["n"] == 2
        assert single[key]["mean"] == pytest.approx(x.mean())
        assert single[key]["se"] == pytest.approx(x.std(ddof=1) / math.sqrt(2))
    assert single["final_gold"]["mean"] == pytest.approx(0.225)
    # seed 0's proxy ends above its value at the gold peak (2.0 > 1.0); seed 1's does not
    # (1.2 < 1.3)
    assert [s["proxy_rising_after_peak"] for s in single["seeds"]] == [True, False]
    assert single["proxy_rising_after_peak"] == 1 and single["peak_at_last_probe"] == 0
    assert single["mean_curve_peak"] == {
        "step": 15, "gold": pytest.approx(0.425), "kl": pytest.approx(9.62),
        "sqrt_kl": pytest.approx(3.1), "proxy": pytest.approx(1.4)}
    refresh = rows["refresh"]  # one seed: no s.e.; the gold had not turned down yet
    assert refresh["n"] == 1 and refresh["peak_gold"]["se"] is None
    assert refresh["peak_at_last_probe"] == 1 and refresh["proxy_rising_after_peak"] == 0
    # the Markdown table, under the figure in results.md and on its own
    own = (tmp_path / "overoptimization.md").read_text()
    for text in (md, own):
        line = next(ln for ln in text.splitlines() if ln.startswith("| single") and "±" in ln)
        assert "0.475 ± 0.025" in line and "7.12 ± 3.1" in line and "1.6 ± 0.4" in line
        assert "1 of 2 seeds" in line
        assert "| refresh | 1 | 0.5 (n=1) |" in text
    assert "![Does the gold score (VADER compound score) peak" in md
    assert "proxy score at the last probe is above" in md


def test_overoptimization_without_probe_records_is_noted():
    table = report.build_sweep_table("none", ["arm"], [{"arm": "a"}], [])
    with pytest.raises(ValueError, match=r"no finished run has 'ppo_eval' records"):
        report.overoptimization_plot(table, Path("/nonexistent/plots"))


# ---- the frontier plot -----------------------------------------------------------------------
def test_frontier_points_are_means_over_seeds_labelled_by_their_setting(tmp_path):
    rng = np.random.default_rng(0)
    summaries, sft = {}, {0: 0.11, 1: 0.19}
    for arm, method in (("ppo-kl0.05", "ppo"), ("ppo-target2", "ppo"), ("dpo-beta0.1", "dpo")):
        for seed in (0, 1):
            summaries[arm, seed] = {"sft": {"judge_mean": sft[seed], "kl": 0.0},
                                    method: {"judge_mean": float(rng.normal()),
                                             "kl": float(rng.uniform(1, 8))}}
    kl = {"kind": "fixed", "init_kl_coef": 0.05, "target": None, "horizon": None}
    configs = {"ppo-kl0.05": {"ppo": {"ppo": {"kl": kl}}},
               "ppo-target2": {"ppo": {"ppo": {"kl": dict(kl, kind="adaptive", target=2.0)}}},
               "dpo-beta0.1": {"dpo": {"dpo": {"beta": 0.1}}}}
    table = _fake_sweep(tmp_path, list(summaries), summaries, configs)
    md = report.write_sweep_report(tmp_path, table, title="f", plots=[
        ("frontier", {"score_name": "VADER"})]).read_text()
    assert (tmp_path / "plots" / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    points = json.loads((tmp_path / "frontier.json").read_text())["points"]
    assert [(p["family"], p["label"]) for p in points] == [
        ("PPO (fixed KL)", "KL coef 0.05"), ("PPO (adaptive KL)", "target 2"), ("DPO", "β=0.1"),
        ("SFT", "SFT")]
    for p, (arm, method) in zip(points, (("ppo-kl0.05", "ppo"), ("ppo-target2", "ppo"),
                                         ("dpo-beta0.1", "dpo"))):
        for key in ("kl", "judge_mean"):
            x = np.array([summaries[arm, s][method][key] for s in (0, 1)])
            name = "kl" if key == "kl" else "score"
            assert p[f"{name}_mean"] == pytest.approx(x.mean())
            assert p[f"{name}_se"] == pytest.approx(x.std(ddof=1) / math.sqrt(2))
        assert p["n"] == 2
    # the reference: one value per distinct seed, not one per point
    assert points[-1]["score_mean"] == pytest.approx(0.15)
    assert points[-1]["score_se"] == pytest.approx(0.04)
    assert "| dpo-beta0.1 | DPO | β=0.1 | 2 |" in md and "Rafailov et al. 2023" in md
    # the figure: every point annotated at its mean, families apart
    fig = plots.frontier_figure([plots.FrontierPoint(**p) for p in points])
    ax = fig.axes[0]
    notes = {t.get_gid(): t.xy for t in ax.texts}
    assert notes["point:DPO:β=0.1"] == pytest.approx((points[2]["kl_mean"],
                                                       points[2]["score_mean"]))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "PPO (fixed KL)", "PPO (adaptive KL)", "DPO", "SFT"]
    with pytest.raises(ValueError, match=r"no finished grid point has \['ppo.judge_mean'"):
        report.frontier_plot(report.build_sweep_table("e", ["arm"], [{"arm": "a"}], []),
                             tmp_path / "plots")


def test_frontier_family_without_a_configuration():
    assert report.frontier_family("ppo", None, "arm=x") == ("PPO", "arm=x")
    assert report.frontier_family("kto", {}, "y") == ("KTO", "y")


# ---- data.max_preferences --------------------------------------------------------------------
def test_random_subset_is_seeded_uniform_and_keeps_order():
    from rlhf_jax.tasks.sentiment.records import random_subset
    recs = [{"i": i} for i in range(100)]
    a = random_subset(recs, 10, seed=0)
    assert len(a) == 10 and a == random_subset(recs, 10, seed=0)
    assert [r["i"] for r in a] == sorted(r["i"] for r in a)
    assert a != random_subset(recs, 10, seed=1) and a != recs[:10]
    assert random_subset(recs, None) == recs and random_subset(recs, 500) == recs
    with pytest.raises(ValueError, match="n=0"):
        random_subset(recs, 0)
    with pytest.raises(ValueError, match="max_preferences must be >= 1"):
        DataConfig(max_preferences=0)


def test_max_preferences_limits_the_training_comparisons_only():
    from rlhf_jax.assets import default_cache_dir
    from rlhf_jax.presets import smollm2_sentiment
    from rlhf_jax.tasks.files import files_task
    from rlhf_jax.tasks.sentiment.task import sentiment_records
    sdist = default_cache_dir() / "vaderSentiment-3.3.2" / "vaderSentiment-3.3.2.tar.gz"
    if not sdist.exists():
        pytest.skip(f"the human ratings are not cached ({sdist}); tests/tasks fetch them")
    data = smollm2_sentiment().data
    full = sentiment_records(data)
    cut = sentiment_records(dataclasses.replace(data, max_preferences=256))
    assert len(full["preferences"]) > 4000 and len(cut["preferences"]) == 256
    key = [(r["chosen_id"], r["rejected_id"]) for r in full["preferences"]]
    picked = [key.index((r["chosen_id"], r["rejected_id"])) for r in cut["preferences"]]
    assert picked == sorted(picked) and picked[-1] > 2000  # a sample, not the first 256
    for role in ("sft", "eval_preferences", "prompts", "eval_prompts", "unpaired"):
        assert cut[role] == full[role]
    cfg = dataclasses.replace(tiny(), data=DataConfig(kind="files", preferences="p.jsonl",
                                                      max_preferences=5))
    with pytest.raises(ValueError, match="applies to the sentiment task only"):
        files_task(cfg)
