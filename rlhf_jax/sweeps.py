"""Sweeps: the pipeline over a grid of configuration values x seeds, with every stage output
stored once under its content address and shared by the runs that need it.

``rlhf-jax sweep --preset tiny --grid 'ppo.ppo.kl.init_kl_coef=0.05,0.2' --seeds 3`` runs the
cartesian product of the grid axes (dotted ``PipelineConfig`` field paths, the same paths the
``pipeline`` command overrides) times the seeds, each point one ``rlhf_jax.pipeline`` run, then
writes the mean ± s.e. over seeds of every summary number per grid point
(``rlhf_jax.report.write_sweep_report``). A named sweep (``SWEEPS``, ``--sweep NAME``) fixes
the base preset, the grid, the seeds, the summary numbers shown and the plots.

Arms. A cartesian product cannot say "PPO at three KL coefficients *and* DPO at three β"
without also running PPO at every β. ``SweepSpec.arms`` can: each ``SweepArm`` is a named set of
overrides (``{"stages": ("sft", "dpo", "eval"), "dpo.dpo.beta": 0.1}``), and the sweep's points
are the *union* over its arms, each arm times the grid's product (usually empty) times the
seeds. The arm's name is the point's first value (the pseudo-axis ``ARM_AXIS``, ``"arm"``), so
the results table has one row per arm.

Content addressing. A stage's address is ``rlhf_jax.pipeline.artifacts.stage_identity``: the
SHA-256 of its own configuration sections (``Stage.sections``: the seed, task, policy and data
sections and its own), the task, and the addresses of the stage outputs it reads
(``Stage.inputs_for``), recursively. A sweep directory holds::

    sweep.json                      the plan: every point, its values, seed, stage addresses
    stages/<stage>-<address[:16]>/  one stage output (the pipeline's stage directory), plus
                                    address.json (the full address and what it hashes)
    runs/<values>-<hash>/           one point: a pipeline run directory whose <stage> entries
                                    are relative symbolic links into stages/, point.json
                                    (index, values, seed, the stage outputs it uses),
                                    summary.json and report.md of its evaluation, and
                                    point_complete.json once finished
    results.json, results.md, plots/  the table over seeds and its plots

Points with the same stage address share one directory: a KL sweep trains one SFT and one
reward model (and one DPO policy); a stage reruns only when its configuration or an input
changed. By default the seeds set ``PipelineConfig.seed``, which every stage reads, so each
seed is an independent replicate of the whole pipeline (its s.e. covers SFT and RM noise
too); ``seed_field`` names another integer field instead, and any stage that does not read
it is then shared across seeds.

Resume and concurrency. A finished point (``point_complete.json`` naming the same stage
addresses) is skipped; the pipeline skips finished stages and continues an interrupted one
from its checkpoint. Each run directory has the pipeline's lock; a shared stage trains under
its own lock (``rlhf_jax.pipeline.run.Run.stage_lock``), so separate jobs (``--index I``, or
whole sweeps over the same directory) never train one stage output twice: a job that needs a
stage another job is training waits for it, and a point another job is running is skipped.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import logging
import os
import re
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from rlhf_jax.config import config_to_dict
from rlhf_jax.pipeline.config import RESULT_NEUTRAL_FIELDS, PipelineConfig
from rlhf_jax.registry import add_to
from rlhf_jax.report import ARM_AXIS  # the pseudo-axis of a sweep with arms: ``"arm"``

log = logging.getLogger(__name__)

POINT_FILE = "point.json"
POINT_COMPLETE_FILE = "point_complete.json"
ADDRESS_FILE = "address.json"
SWEEP_FILE = "sweep.json"
#: Hex digits of a stage address in its directory name (64 bits).
ADDRESS_DIGITS = 16


# ---- field paths and typed values ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FieldRef:
    """A leaf field of ``PipelineConfig``: its canonical dotted ``path`` (underscores) and
    its type annotation ``type``."""
    path: str
    type: Any


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp: Any):
    """The dataclass behind ``tp`` (``C`` or ``C | None``), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(tp):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if len(found) == 1:
            return found[0]
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def resolve_field(path: str, root: type = PipelineConfig) -> FieldRef:
    """The leaf field at dotted ``path`` (``-`` and ``_`` interchangeable, as on the command
    line: ``ppo.ppo.kl.init-kl-coef``).

    Raises:
      ValueError: an empty path, an unknown name (with the known names at that level and the
        closest matches), or a path that stops at a section (a nested config) instead of a
        field.
    """
    parts = [p.replace("-", "_") for p in str(path).strip().split(".")]
    if not path or not all(parts):
        raise ValueError(f"bad field path {path!r}: expected dotted names such as "
                         "'ppo.ppo.kl.init_kl_coef'")
    cls, tp = root, root
    for i, part in enumerate(parts):
        if cls is None:
            raise ValueError(f"field path {path!r}: {'.'.join(parts[:i])!r} is a field, not a "
                             "section; it has no sub-fields")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            close = difflib.get_close_matches(part, names, n=3)
            raise ValueError(f"unknown field {part!r} in path {path!r}: {where} has "
                             f"{', '.join(names)}"
                             + (f" (did you mean {' or '.join(repr(c) for c in close)}?)"
                                if close else ""))
        tp = _hints(cls)[part]
        cls = _dataclass_of(tp)
    if cls is not None:
        sub = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"field path {path!r} names a section ({cls.__name__}), not a field; "
                         f"give one of its fields: {'.'.join(parts)}.{{{sub}}}")
    return FieldRef(".".join(parts), tp)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def convert_value(ref: FieldRef, raw: Any) -> Any:
    """``raw`` (command-line text, or a JSON / Python value) as a value of ``ref``'s type:
    ``bool`` (true/false/yes/no/1/0), ``int``, ``float``, ``str``, ``Path``, ``Literal``
    choices, ``tuple[X, ...]`` (a list; a single scalar makes a 1-tuple), ``None`` (text
    ``none`` / ``null``) for optional fields, and unions of these (first that fits).

    Raises:
      ValueError: ``raw`` does not fit the type (names the field, the value and the type).
    """
    try:
        return _convert(ref.type, raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad value {raw!r} for {ref.path} (type {_type_name(ref.type)}): "
                         f"{e}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, raw: Any) -> Any:
    if tp is Any:
        return raw
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if type(None) in args and (raw is None or (isinstance(raw, str)
                                                   and raw.strip().lower() in ("none", "null"))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, raw)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        for choice in args:
            if raw == choice or (isinstance(raw, str) and str(choice) == raw.strip()):
                return choice
        raise ValueError(f"expected one of {list(args)}")
    if origin is tuple:
        elem = args[0] if args else Any
        items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(elem, x) for x in items)
        if len(items) != len(args):
            raise ValueError(f"expected {len(args)} items, got {len(items)}")
        return tuple(_convert(a, x) for a, x in zip(args, items))
    if isinstance(raw, (list, tuple, dict)):
        raise ValueError(f"expected a single {_type_name(tp)}, got {type(raw).__name__}")
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(raw, bool):
            raise ValueError("expected an integer, got a boolean")
        if isinstance(raw, float):
            if not raw.is_integer():
                raise ValueError("expected an integer")
            return int(raw)
        return int(str(raw).strip()) if isinstance(raw, str) else int(raw)
    if tp is float:
        if isinstance(raw, bool):
            raise ValueError("expected a number, got a boolean")
        return float(raw.strip()) if isinstance(raw, str) else float(raw)
    if tp is str:
        if not isinstance(raw, str):
            raise ValueError(f"expected text, got {type(raw).__name__}")
        return raw
    if tp is Path:
        if not isinstance(raw, (str, os.PathLike)):
            raise ValueError(f"expected a path, got {type(raw).__name__}")
        return Path(raw)
    raise ValueError(f"fields of type {_type_name(tp)} cannot be set by a sweep")


def get_field(cfg: Any, path: str) -> Any:
    """The value at dotted ``path`` of ``cfg`` (``resolve_field`` spelling).

    Raises:
      ValueError: as ``resolve_field``, or a section on the way is ``None``.
    """
    ref = resolve_field(path, type(cfg))
    node = cfg
    for i, part in enumerate(ref.path.split(".")):
        if node is None:
            raise ValueError(f"{'.'.join(ref.path.split('.')[:i])} is None in this configuration")
        node = getattr(node, part)
    return node


class _Sub(dict):
    """Changes under one section (to tell them apart from a field's value)."""


def with_fields(cfg: Any, changes: Mapping[str, Any], *, context: str = "") -> Any:
    """``cfg`` with every ``{dotted path: value}`` of ``changes`` set at once: each nested
    config is rebuilt once with all its changes, so fields that must change together (e.g.
    ``ppo.ppo.kl.kind`` and ``ppo.ppo.kl.target``) are validated together. Values are used as
    given (``convert_value`` them first).

    Raises:
      ValueError: an unknown path, a section that is ``None`` in ``cfg``, the same field set
        twice, or a combination the configs' own checks refuse (their message, prefixed with
        ``context``).
    """
    tree: _Sub = _Sub()
    for path, value in changes.items():
        parts = resolve_field(path, type(cfg)).path.split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, _Sub())
        if parts[-1] in node:
            raise ValueError(f"{'.'.join(parts)} is set twice")
        node[parts[-1]] = value

    def apply(obj, sub: _Sub, prefix: str):
        kwargs = {}
        for name, v in sub.items():
            where = f"{prefix}{name}"
            if isinstance(v, _Sub):
                current = getattr(obj, name)
                if current is None:
                    raise ValueError(f"{where} is None in the base configuration; set the whole "
                                     f"section first (e.g. with the preset or an override)")
                v = apply(current, v, where + ".")
            kwargs[name] = v
        return dataclasses.replace(obj, **kwargs)

    try:
        return apply(cfg, tree, "")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{context}{': ' if context else ''}{e}") from None


# ---- grid axes -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GridAxis:
    """One grid axis: a leaf field ``path`` (canonical dotted name) and its ``values`` in
    order (typed: ``convert_value``)."""
    path: str
    values: tuple[Any, ...]

    @classmethod
    def of(cls, path: str, values: Sequence[Any]) -> "GridAxis":
        """An axis from Python (or JSON) values, converted to the field's type.

        Raises:
          ValueError: unknown path, a value of the wrong type, no values, or a value twice.
        """
        ref = resolve_field(path)
        vals = tuple(convert_value(ref, v) for v in values)
        if not vals:
            raise ValueError(f"grid axis {ref.path} has no values")
        dup = [v for i, v in enumerate(vals) if v in vals[:i]]
        if dup:
            raise ValueError(f"grid axis {ref.path} repeats {dup}")
        return cls(ref.path, vals)


def parse_grid(spec: str) -> GridAxis:
    """A grid axis from ``PATH=V1,V2,...`` (comma-separated values) or ``PATH=[JSON list]``
    (for values with commas, e.g. tuples: ``data.domains=[["tweets"], ["tweets",
    "editorials"]]``); each value is converted to the field's type (``convert_value``).

    Raises:
      ValueError: no ``=``, an unknown or section path, a bad value (each names the path
        and the value), no values, a value twice, or malformed JSON.
    """
    if "=" not in spec:
        raise ValueError(f"bad grid {spec!r}: expected PATH=V1,V2,... such as "
                         "'ppo.ppo.kl.init_kl_coef=0.01,0.05,0.2'")
    path, text = (x.strip() for x in spec.split("=", 1))
    resolve_field(path)  # a bad path is reported before a bad value
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"grid {path}: bad JSON list {text!r}: {e}") from None
        if not isinstance(values, list):
            raise ValueError(f"grid {path}: expected a JSON list, got {text!r}")
    else:
        values = [v.strip() for v in text.split(",")] if text.strip() else []
        if any(v == "" for v in values):
            raise ValueError(f"grid {path}: empty value in {text!r}")
    return GridAxis.of(path, values)


# ---- sweep specifications and their registry -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepPlot:
    """A plot of a sweep: a registered kind (``rlhf_jax.report.register_sweep_plot``) and its
    parameters, e.g. ``SweepPlot("metric_vs_axis", {"metric": "ppo.judge_mean"})``."""
    kind: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SweepArm:
    """One arm of a sweep: its ``name`` (the table's row label, part of the run directory's
    name) and the ``{dotted path: value}`` ``overrides`` that make it, set on the base
    configuration together with the grid values and the seed (values are converted with
    ``convert_value``; paths are resolved when the sweep is planned, so an arm may name a field
    that a later version of the library adds)."""
    name: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """What a sweep runs.

    Attributes:
      name: the sweep's name (report title; default directory ``runs/sweeps/<name>``).
      preset: the base pipeline preset (``rlhf_jax.presets``).
      grid: axes, as ``GridAxis`` or ``PATH=V1,V2`` strings (``parse_grid``); points are
        their cartesian product, the first axis varying slowest.
      seeds: seeds per grid point: ``seed_field``'s base value + 0, 1, ..., ``seeds - 1``.
      seed_field: the integer field the seeds set (default ``seed``, read by every stage).
      overrides: ``{dotted path: value}`` applied to the preset before the grid (values are
        converted with ``convert_value``; command-line ``--field`` overrides come after).
      arms: ``SweepArm``s: the points are the union over the arms of (the arm's overrides x
        the grid's product x the seeds), arm by arm; the arm's overrides come after the
        command line's. Empty: the grid alone.
      metrics: fnmatch patterns of the summary numbers in the table's main view (default
        ``rlhf_jax.report.DEFAULT_SWEEP_METRICS``; the JSON always has every number).
      plots: the sweep's plots.
      description: one line for ``rlhf-jax sweep --help`` and the report.
    """
    name: str
    preset: str
    grid: tuple[GridAxis | str, ...] = ()
    seeds: int = 1
    seed_field: str = "seed"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    arms: tuple[SweepArm, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[SweepPlot, ...] = ()
    description: str = ""

    def __post_init__(self):
        if self.seeds < 1:
            raise ValueError(f"SweepSpec.seeds must be >= 1, got {self.seeds}")
        names = [a.name for a in self.arms]
        bad = [n for n in names if not isinstance(n, str) or not _ARM_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"sweep {self.name}: arm names {bad} must be non-empty and use only "
                             "letters, digits and _ . + = - (they name run directories)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sweep {self.name}: arm names {dup} are given more than once")

    @property
    def axis_names(self) -> tuple[str, ...]:
        """The names a point's ``values`` hold: ``ARM_AXIS`` first when there are arms, then
        the grid axes' paths."""
        return ((ARM_AXIS,) if self.arms else ()) + tuple(a.path for a in self.axes)

    @property
    def axes(self) -> tuple[GridAxis, ...]:
        """The grid axes, parsed and converted.

        Raises:
          ValueError: a bad axis (``parse_grid``) or the same field on two axes.
        """
        axes = tuple(a if isinstance(a, GridAxis) else parse_grid(a) for a in self.grid)
        paths = [a.path for a in axes]
        dup = sorted({p for p in paths if paths.count(p) > 1})
        if dup:
            raise ValueError(f"grid axes {dup} are given more than once")
        return axes


#: Named sweeps: name -> factory (``rlhf-jax sweep --sweep NAME``).
SWEEPS: dict[str, Callable[[], SweepSpec]] = {}


def register_sweep(name: str):
    """Decorator: register ``factory() -> SweepSpec`` as sweep ``name``.

    Raises:
      ValueError: ``name`` is already registered.
    """
    return add_to(SWEEPS, "sweep", name)


def get_sweep(name: str) -> SweepSpec:
    """The named sweep.

    Raises:
      KeyError: unknown name (lists the known ones).
    """
    if name not in SWEEPS:
        raise KeyError(f"unknown sweep {name!r}; known sweeps: {sorted(SWEEPS)}")
    return SWEEPS[name]()


@register_sweep("tiny-kl")
def tiny_kl() -> SweepSpec:
    """CI-sized: the ``tiny`` preset with a fixed KL coefficient of 0.05 or 0.2, two seeds.
    The two coefficients share one SFT, one reward model and one DPO policy per seed."""
    return SweepSpec(
        name="tiny-kl", preset="tiny",
        grid=(GridAxis.of("ppo.ppo.kl.init_kl_coef", (0.05, 0.2)),),
        seeds=2,
        overrides={"ppo.ppo.kl.kind": "fixed", "ppo.ppo.kl.target": None,
                   "ppo.ppo.kl.horizon": None, "eval.num_samples": 1},
        metrics=("ppo.judge_mean", "ppo.kl", "ppo.rm_score", "sft.judge_mean",
                 "rm_heldout_accuracy"),
        plots=(SweepPlot("metric_vs_axis", {"metric": "ppo.judge_mean"}),
               SweepPlot("metric_vs_axis", {"metric": "ppo.kl"})),
        description="tiny preset, fixed KL coefficient 0.05 / 0.2, 2 seeds (CI)")


#: Stages of a PPO point and of a DPO point of a frontier sweep (each reads the shared SFT;
#: PPO also the shared reward model).
PPO_POINT_STAGES = ("sft", "rm", "ppo", "eval")
DPO_POINT_STAGES = ("sft", "dpo", "eval")


@register_sweep("sentiment-overoptimization")
def sentiment_overoptimization() -> SweepSpec:
    """Reward hacking on the main job's task: a proxy reward model that a policy can exploit,
    gold (VADER) and proxy scores probed along long, unregularised PPO runs (Gao et al.
    2023, "Scaling Laws for Reward Model Overoptimization", Fig. 1), and two remedies, as
    three arms x 2 seeds:

    * ``single``: one reward model (the proxy), trained on a random 64 of the 4,541 human
      comparisons (``data.max_preferences``), 16 steps x 16 pairs (4 epochs): small enough
      to be exploitable, as Gao et al.'s small-data proxies are;
    * ``ensemble``: 3 whole reward models (``rm.ensemble``, each its own trunk, Poisson
      bootstrap of the same 64 pairs); PPO optimises mean - 1.0 x std over the members
      (uncertainty-weighted optimisation, Coste et al. 2023);
    * ``refresh``: the single reward model retrained during RL every 10 iterations on 32
      fresh pairs of the policy's own samples labelled by the gold score (Bradley-Terry
      labels, temperature 0.1), 8 reward-model steps per round (iterated RLHF, Bai et al.
      2022 §4.5).

    Common to all: PPO 30 iterations x 16 prompts at learning rate 1e-4 with **no KL
    penalty** (``init_kl_coef`` 0: as in Gao et al.'s main RL runs, the distance from the
    start is the x-axis, not a leash), no response-length floor (``min_new_tokens`` 0: the
    main job measured that PPO then games the reward model by ending early), the
    gold-vs-proxy probe every 5 iterations on 40 held-out prompts (steps 0, 5, ..., 30);
    stages SFT -> RM -> PPO (no DPO, no final evaluation: the probe is the measurement). Per
    seed, one SFT is shared by the arms and one reward model by ``single`` and ``refresh``
    (content addressing).

    The sizes were chosen by a pilot of ``single`` (seed 0; 40 iterations, 64 probe prompts):
    gold 0.19 -> 0.40 at iteration 15 (10 nats) -> 0.20 to 0.35 after, while the proxy rose
    0.17 -> 0.24 -> 0.71 at iteration 30. The first sizes (256 pairs, 8 prompts per
    iteration, learning rate 5e-5, KL coefficient 0.01) gave a proxy that PPO barely moved
    (experiments/overoptimization.md).

    Sizing, from the main job's stage times on the 2-core CPU (experiments/smollm2_sentiment.md:
    SFT 79 s, RM 188 s for 60 steps, PPO 231 s for 20 x 16 prompts, i.e. 11.5 s per iteration
    of 16 prompts, eval 137 s for 3 policies x 128 prompts, i.e. 0.36 s per sampled and
    scored prompt), each scaled linearly with its work (optimistic for shrunk stages by their
    fixed costs, compilation and loading):

    ===========================  ==================================================  =======
    what                         arithmetic                                          seconds
    ===========================  ==================================================  =======
    SFT, 2 seeds                 2 x 79                                                  158
    RM (single), 2 seeds         2 x 188 x 16/60                                         100
    RM (ensemble, K=3), 2 seeds  2 x 3 x 50 (every member pays a whole RM: a bound)      300
    PPO per run                  30 x 11.5 + 7 probes x 40 prompts x 0.36                446
    PPO single, 2 seeds          2 x 446                                                 892
    PPO ensemble, 2 seeds        2 x 446 x 1.15 (3 reward-model passes per rollout,     1026
                                 and the staged RL step they need)
    PPO refresh, 2 seeds         2 x (446 + 2 rounds x (64 samples x 0.36 + 8 RM steps  1076
                                 x 3.1 s, i.e. 188 s / 60)); rounds before iterations
                                 10 and 20
    total                                                                        3552 = 59 min
    ===========================  ==================================================  =======

    If the first PPO point runs much slower (another job on the cores), lower
    ``--ppo.iterations``; the probe's step-0 point and the curves stay comparable.
    """
    return SweepSpec(
        name="sentiment-overoptimization", preset="smollm2-sentiment", seeds=2,
        overrides={"stages": ("sft", "rm", "ppo"),
                   "data.max_preferences": 64, "rm.steps": 16,
                   "ppo.iterations": 30, "ppo.batch_size": 16, "ppo.optimizer.lr": 1e-4,
                   "ppo.ppo.kl.init_kl_coef": 0.0, "ppo.ppo.sampling.min_new_tokens": 0,
                   "ppo.probe_every": 5, "ppo.probe_prompts": 40},
        arms=(SweepArm("single", {}),
              SweepArm("ensemble", {"rm.ensemble": 3, "rm.ensemble_trunk": "separate",
                                    "ppo.reward_aggregation": "mean_minus_std",
                                    "ppo.reward_uncertainty_coef": 1.0}),
              SweepArm("refresh", {"ppo.refresh_every": 10, "ppo.refresh_pairs": 32,
                                   "ppo.refresh_steps": 8, "ppo.refresh_temperature": 0.1})),
        plots=(SweepPlot("overoptimization", {"gold_name": "VADER compound score",
                                              "proxy_name": "reward model (normalised)"}),),
        description="smollm2-sentiment with a hackable proxy RM (64 human pairs) and PPO "
                    "without a KL penalty: gold vs proxy along PPO for a single RM, a "
                    "3-member ensemble (mean - std) and iterated refresh, 2 seeds")


@register_sweep("sentiment-frontier")
def sentiment_frontier() -> SweepSpec:
    """The reward–KL frontier of the main job's task (Rafailov et al. 2023, Fig. 2): VADER
    judge score against KL to the SFT policy for PPO at fixed KL coefficients 0.01 / 0.05 /
    0.2, PPO with the adaptive KL controller (Ziegler et al. 2019 §2.2) at targets 2 and 5
    nats (initial coefficient 0.05, horizon 32 samples, so the coefficient can move by up to
    10% per iteration of 16 samples), and DPO at β 0.05 / 0.1 / 0.3: eight arms (a union,
    not a product: PPO points do not run DPO and the other way round), 2 seeds. PPO runs 12
    iterations x 16 prompts, DPO 20 steps x 8 pairs, and each point's evaluation judges its
    policy and the SFT policy on 64 held-out prompts. Per seed, every point shares one SFT and
    the PPO points one reward model (content addressing).

    Sizing, from the main job's stage times on the 2-core CPU (experiments/smollm2_sentiment.md,
    as in ``sentiment-overoptimization``), each scaled linearly with its work:

    ====================  =================================================  =======
    what                  arithmetic                                         seconds
    ====================  =================================================  =======
    SFT + RM per seed     79 + 188                                               267
    a PPO point           231 x 12/20 + eval 2 policies x 64 x 0.36 s            185
    a DPO point           248 x 20/40 + 46                                       170
    per seed              267 + 5 x 185 + 3 x 170                               1702
    total, 2 seeds        2 x 1702                                      3404 = 57 min
    ====================  =================================================  =======
    """
    ppo, dpo = PPO_POINT_STAGES, DPO_POINT_STAGES
    kl = "ppo.ppo.kl"
    arms = ([SweepArm(f"ppo-kl{c:g}", {"stages": ppo, f"{kl}.init_kl_coef": c})
             for c in (0.01, 0.05, 0.2)]
            + [SweepArm(f"ppo-target{t:g}", {"stages": ppo, f"{kl}.kind": "adaptive",
                                             f"{kl}.target": t, f"{kl}.horizon": 32.0})
               for t in (2.0, 5.0)]
            + [SweepArm(f"dpo-beta{b:g}", {"stages": dpo, "dpo.dpo.beta": b})
               for b in (0.05, 0.1, 0.3)])
    return SweepSpec(
        name="sentiment-frontier", preset="smollm2-sentiment", seeds=2,
        overrides={"ppo.iterations": 12, "dpo.steps": 20, "eval.num_prompts": 64},
        arms=tuple(arms),
        metrics=("ppo.judge_mean", "ppo.kl", "dpo.judge_mean", "dpo.kl", "sft.judge_mean",
                 "ppo.rm_score", "rm_heldout_accuracy"),
        plots=(SweepPlot("frontier", {"score_name": "VADER compound score"}),),
        description="smollm2-sentiment: PPO at fixed KL 0.01/0.05/0.2 and adaptive targets "
                    "2/5, DPO at β 0.05/0.1/0.3; VADER against KL to SFT, 2 seeds")


def base_config(spec: SweepSpec) -> PipelineConfig:
    """The sweep's base configuration: its preset with ``spec.overrides`` set (together).

    Raises:
      KeyError: unknown preset.
      ValueError: a bad override path or value (names it).
    """
    from rlhf_jax.presets import get_preset
    base = get_preset(spec.preset)
    try:
        changes = {resolve_field(k).path: convert_value(resolve_field(k), v)
                   for k, v in spec.overrides.items()}
        return with_fields(base, changes)
    except ValueError as e:
        raise ValueError(f"sweep {spec.name} overrides: {e}") from None


# ---- the plan ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep.

    Attributes:
      index: position in the sweep (grid order, seeds innermost): ``--index`` selects it.
      values: ``{axis path: value}`` of its grid point.
      seed: the value of the seed field.
      cfg: its pipeline configuration (``out_dir`` is ``run_dir``).
      run_dir: its run directory.
      stages: ``{stage: address}`` of every stage output it uses (its stages and what they
        read), in pipeline order.
    """
    index: int
    values: Mapping[str, Any]
    seed: int
    cfg: PipelineConfig
    run_dir: Path
    stages: Mapping[str, str]

    @property
    def label(self) -> str:
        """``axis=value, ..., seed=S`` with each axis's last path component."""
        from rlhf_jax.report import format_value
        return ", ".join([f"{a.rsplit('.', 1)[-1]}={format_value(v)}"
                          for a, v in self.values.items()] + [f"seed={self.seed}"])


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """A sweep resolved against its base configuration (``plan_sweep``)."""
    spec: SweepSpec
    out: Path
    axes: tuple[GridAxis, ...]
    seeds: tuple[int, ...]
    points: tuple[SweepPoint, ...]

    def stage_dir(self, stage: str, address: str) -> Path:
        """``<out>/stages/<stage>-<address[:16]>``."""
        return self.out / "stages" / f"{stage}-{address[:ADDRESS_DIGITS]}"

    @property
    def axis_names(self) -> tuple[str, ...]:
        """The table's axes: ``ARM_AXIS`` first when the sweep has arms, then the grid's."""
        return ((ARM_AXIS,) if self.spec.arms else ()) + tuple(a.path for a in self.axes)

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point's ``{axis: value}`` in grid order (with arms: arm by arm, each
        ``{ARM_AXIS: name, **grid values}``)."""
        combos = [dict(zip((a.path for a in self.axes), combo))
                  for combo in itertools.product(*(a.values for a in self.axes))]
        if not self.spec.arms:
            return combos
        return [{ARM_AXIS: arm.name, **g} for arm in self.spec.arms for g in combos]

    def point(self, index: int) -> SweepPoint:
        """Point ``index``.

        Raises:
          IndexError: out of range (names the range).
        """
        if not 0 <= index < len(self.points):
            raise IndexError(f"--index {index} is out of range: the sweep has {len(self.points)} "
                             f"points, 0..{len(self.points) - 1} (--list shows them)")
        return self.points[index]


def linked_stages(cfg: PipelineConfig) -> list[str]:
    """The stages whose outputs a run of ``cfg`` writes or reads: its stages that write a
    ``final/`` and, recursively, the inputs they read under ``cfg``, in pipeline order."""
    from rlhf_jax.pipeline.registry import get_stage, stage_names
    need = {s for s in cfg.stages if get_stage(s).writes_final}
    todo = list(need)
    while todo:
        for s in get_stage(todo.pop()).inputs_for(cfg):
            if s not in need:
                need.add(s)
                todo.append(s)
    return [s for s in stage_names() if s in need]


def result_config(cfg: PipelineConfig) -> dict:
    """``cfg`` as a dict without the result-neutral fields (``RESULT_NEUTRAL_FIELDS``)."""
    d = config_to_dict(cfg)
    for path in RESULT_NEUTRAL_FIELDS:
        *parents, leaf = path.split(".")
        node = d
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return d


def _slug(text: str, limit: int = 96) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-")[:limit] or "point"


def arm_changes(spec: SweepSpec, arm: SweepArm) -> dict[str, Any]:
    """``arm``'s overrides as ``{canonical path: typed value}``.

    Raises:
      ValueError: an unknown path (e.g. a field this version of the library lacks) or a bad
        value, named with the sweep and the arm; a path that is also a grid axis or the seed
        field.
    """
    try:
        changes = {}
        for k, v in arm.overrides.items():
            ref = resolve_field(k)
            if ref.path in changes:
                raise ValueError(f"{ref.path} is set twice")
            changes[ref.path] = convert_value(ref, v)
    except ValueError as e:
        raise ValueError(f"sweep {spec.name}, arm {arm.name!r}: {e}") from None
    fixed = {a.path for a in spec.axes} | {resolve_field(spec.seed_field).path}
    clash = sorted(set(changes) & fixed)
    if clash:
        raise ValueError(f"sweep {spec.name}, arm {arm.name!r} sets {clash}, which the grid or the "
                         "seeds set; an arm may not override them")
    return changes


def plan_sweep(spec: SweepSpec, base: PipelineConfig, out: Path) -> SweepPlan:
    """Resolve ``spec`` against ``base`` (the preset with its overrides): every point's
    configuration, run directory and stage addresses, arm by arm (``spec.arms``; none: the
    grid alone), then grid point by grid point (first axis slowest), seeds innermost. Pure:
    nothing is written.

    Raises:
      ValueError: a bad axis or value, a seed field that is not an integer field or is also a
        grid axis, a bad arm (``arm_changes``), a point the configs' checks refuse (names the
        point), ``base.resume`` off or ``base.force_restart`` set (a sweep reuses what is
        finished; to train a stage again, remove its ``stages/`` directory).
    """
    if not base.resume:
        raise ValueError("a sweep always resumes (finished stages are shared); drop --no-resume "
                         "or choose another sweep directory")
    if base.force_restart:
        raise ValueError("--force-restart does not apply to sweeps: to train a stage output "
                         "again, move its directory out of <sweep>/stages/")
    axes = spec.axes
    seed_ref = resolve_field(spec.seed_field)
    if seed_ref.type is not int:
        raise ValueError(f"seed field {seed_ref.path} is of type {_type_name(seed_ref.type)}; "
                         "it must be an int field")
    if seed_ref.path in [a.path for a in axes]:
        raise ValueError(f"{seed_ref.path} is both the seed field and a grid axis; use --seeds "
                         "or another --seed-field")
    out = Path(out)
    seed0 = get_field(base, seed_ref.path)
    seeds = tuple(seed0 + i for i in range(spec.seeds))
    points = []
    arms = [(arm.name, arm_changes(spec, arm)) for arm in spec.arms] or [(None, {})]
    for arm, changes in arms:
        for combo in itertools.product(*(a.values for a in axes)):
            grid_values = dict(zip((a.path for a in axes), combo))
            values = ({ARM_AXIS: arm} if arm is not None else {}) | grid_values
            for seed in seeds:
                index = len(points)
                cfg = with_fields(base, {**changes, **grid_values, seed_ref.path: seed},
                                  context=f"sweep point {index} ({values}, seed {seed})")
                points.append(_point(spec, out, index, values, seed, seed_ref, cfg))
    return SweepPlan(spec=spec, out=out, axes=axes, seeds=seeds, points=tuple(points))


def _point(spec: SweepSpec, out: Path, index: int, values: dict, seed: int, seed_ref: FieldRef,
           cfg: PipelineConfig) -> SweepPoint:
    """The point of ``cfg``: its run directory (``runs/<values>-<hash of the result
    configuration>``), name and stage addresses."""
    from rlhf_jax.pipeline.artifacts import stage_identity_record
    digest = hashlib.sha256(json.dumps(result_config(cfg), sort_keys=True,
                                       default=str).encode()).hexdigest()
    slug = _slug("_".join([str(v) if p == ARM_AXIS else f"{p.rsplit('.', 1)[-1]}={v}"
                           for p, v in values.items()]
                          + [f"{seed_ref.path.rsplit('.', 1)[-1]}={seed}"]))
    run_dir = out / "runs" / f"{slug}-{digest[:8]}"
    name = f"{spec.name}: " + ", ".join(
        [f"{p.rsplit('.', 1)[-1]}={v}" for p, v in values.items()] + [f"seed={seed}"])
    cfg = dataclasses.replace(cfg, out_dir=run_dir, name=name)
    memo: dict = {}
    stages = {s: stage_identity_record(cfg, s, _memo=memo)["identity"]
              for s in linked_stages(cfg)}
    return SweepPoint(index=index, values=values, seed=seed, cfg=cfg, run_dir=run_dir,
                      stages=stages)


# ---- running -------------------------------------------------------------------------------
def _is_main() -> bool:
    import jax
    return jax.process_index() == 0


def _write_json(path: Path, obj: Any) -> None:
    from rlhf_jax.pipeline.artifacts import write_json_atomic
    write_json_atomic(path, obj)


def point_complete(plan: SweepPlan, point: SweepPoint) -> bool:
    """Whether ``point`` finished with the stage outputs and stages it has now
    (``point_complete.json``)."""
    path = point.run_dir / POINT_COMPLETE_FILE
    if not path.exists():
        return False
    done = json.loads(path.read_text())
    return done.get("stages") == dict(point.stages) and done.get("ran") == list(point.cfg.stages)


def prepare_point(plan: SweepPlan, point: SweepPoint) -> None:
    """Create ``point``'s run directory: a relative link ``<run>/<stage>`` to
    ``stages/<stage>-<address>`` for every stage output it uses (the directories of the
    stages it runs are created, with ``address.json``; links to outputs it no longer uses are
    removed), and ``point.json``. Idempotent; process 0 writes, the others wait.

    Raises:
      FileExistsError: ``<run>/<stage>`` is a real directory (not made by a sweep), or a
        stage directory holds another address (a 64-bit prefix collision).
    """
    from rlhf_jax.pipeline.artifacts import barrier, stage_identity_record
    if _is_main():
        point.run_dir.mkdir(parents=True, exist_ok=True)
        memo: dict = {}
        for stage, address in point.stages.items():
            target = plan.stage_dir(stage, address)
            if stage in point.cfg.stages:
                target.mkdir(parents=True, exist_ok=True)
                recorded = target / ADDRESS_FILE
                if recorded.exists():
                    old = json.loads(recorded.read_text())["identity"]
                    if old != address:
                        raise FileExistsError(f"{target} holds stage output {old}, not {address}")
                else:
                    _write_json(recorded, stage_identity_record(point.cfg, stage, _memo=memo))
            link = point.run_dir / stage
            rel = os.path.relpath(target, point.run_dir)
            if link.is_symlink():
                if os.readlink(link) == rel:
                    continue
                tmp = point.run_dir / f".{stage}.link{os.getpid()}"
                tmp.unlink(missing_ok=True)
                os.symlink(rel, tmp)
                os.replace(tmp, link)  # the stage's address changed (e.g. a library update)
            elif link.exists():
                raise FileExistsError(
                    f"{link} is a directory, not a link to a shared stage output: {point.run_dir} "
                    "was not made by a sweep; choose another sweep directory")
            else:
                os.symlink(rel, link)
        from rlhf_jax.pipeline.registry import stage_names
        for stage in stage_names():  # links of an earlier --stages choice that reads less
            link = point.run_dir / stage
            if stage not in point.stages and link.is_symlink():
                link.unlink()
        _write_json(point.run_dir / POINT_FILE, {
            "index": point.index, "values": point.values, "seed": point.seed,
            "seed_field": resolve_field(plan.spec.seed_field).path,
            "stages": {s: os.path.relpath(plan.stage_dir(s, a), plan.out)
                       for s, a in point.stages.items()},
            "addresses": dict(point.stages)})
    barrier("sweep_prepare_point")


@dataclasses.dataclass
class SweepResult:
    """What ``run_sweep`` did: ``status`` per point index (``"done"`` already finished,
    ``"ran"``, ``"busy"`` run by another process, ``"failed: ..."``), the exit code
    (``rlhf_jax.train.loop.exit_code``: 0, or that of the first failed point) and the path of
    ``results.md``."""
    status: dict[int, str]
    exit_code: int
    report: Path | None


def run_point(plan: SweepPlan, point: SweepPoint) -> str:
    """Run one point unless it is finished: ``"done"``, ``"ran"`` or ``"busy"`` (another
    process holds its run directory).

    Raises:
      rlhf_jax.pipeline.StagePreempted: SIGTERM during a stage (its checkpoint is saved).
      rlhf_jax.train.guards.NonFiniteLossError, TrainingStalledError: a stage diverged or
        stalled.
      ConfigChangedError, FileNotFoundError, ...: as ``rlhf_jax.pipeline.run_pipeline``.
    """
    from rlhf_jax.pipeline import run_pipeline
    from rlhf_jax.pipeline.lock import RunLockedError
    if point_complete(plan, point):
        log.info("sweep: point %d (%s) already finished in %s", point.index, point.label,
                 point.run_dir)
        return "done"
    prepare_point(plan, point)
    log.info("sweep: point %d of %d (%s) in %s", point.index, len(plan.points), point.label,
             point.run_dir)
    try:
        run_pipeline(point.cfg)
    except RunLockedError as e:
        if Path(e.path).parent.resolve() != point.run_dir.resolve():
            raise
        log.warning("sweep: point %d is being run by another process (%s); skipping it",
                    point.index, e)
        return "busy"
    mark_point_complete(point)
    return "ran"


def mark_point_complete(point: SweepPoint) -> None:
    """Write ``point_complete.json`` (the stage addresses and stages it ran with; process 0):
    the point counts as finished from now on (``point_complete``)."""
    if _is_main():
        _write_json(point.run_dir / POINT_COMPLETE_FILE,
                    {"stages": dict(point.stages), "ran": list(point.cfg.stages),
                     "time": time.time()})


def plan_json(plan: SweepPlan) -> dict:
    """``sweep.json``: the spec and every point (index, values, seed, run directory, stage
    outputs)."""
    spec = plan.spec
    return {"name": spec.name, "preset": spec.preset, "description": spec.description,
            "axes": {a.path: list(a.values) for a in plan.axes},
            "arms": [{"name": a.name, "overrides": dict(a.overrides)} for a in spec.arms],
            "seed_field": resolve_field(spec.seed_field).path, "seeds": list(plan.seeds),
            "metrics": list(spec.metrics),
            "plots": [{"kind": p.kind, "params": dict(p.params)} for p in spec.plots],
            "points": [{"index": p.index, "values": p.values, "seed": p.seed,
                        "run": os.path.relpath(p.run_dir, plan.out),
                        "stages": {s: os.path.relpath(plan.stage_dir(s, a), plan.out)
                                   for s, a in p.stages.items()}}
                       for p in plan.points]}


def run_sweep(plan: SweepPlan, indices: Sequence[int] | None = None) -> SweepResult:
    """Run the sweep's points (``indices``: only those, and the stages they need), skipping
    finished ones, then rebuild the table from every finished point (``write_results``).

    A point whose training diverges or stalls is recorded (``failed.json`` in its run
    directory) and the sweep goes on; its exit code is returned. A preemption stops the sweep
    at once (rerun the same command to continue).

    Raises:
      IndexError: an index out of range.
      rlhf_jax.pipeline.StagePreempted: SIGTERM during a stage (exit code 75).
      Anything else ``run_pipeline`` raises (a configuration error stops the sweep).
    """
    from rlhf_jax.train.guards import NonFiniteLossError, TrainingStalledError
    from rlhf_jax.train.loop import exit_code
    _setup_logging()
    points = [plan.point(i) for i in indices] if indices is not None else list(plan.points)
    if _is_main():
        _write_json(plan.out / SWEEP_FILE, plan_json(plan))
    status: dict[int, str] = {}
    code = 0
    for point in points:
        try:
            status[point.index] = run_point(plan, point)
        except (NonFiniteLossError, TrainingStalledError) as e:
            log.error("sweep: point %d (%s) failed: %s", point.index, point.label, e)
            status[point.index] = f"failed: {e}"
            code = code or exit_code(e)
            if _is_main():
                _write_json(point.run_dir / "failed.json", {"error": str(e), "time": time.time()})
    busy = [i for i, s in status.items() if s == "busy"]
    if busy:
        log.warning("sweep: points %s were being run by other processes; rerun to include them",
                    busy)
    report = write_results(plan) if _is_main() else None
    return SweepResult(status=status, exit_code=code, report=report)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("rlhf_jax").setLevel(logging.INFO)


# ---- results -------------------------------------------------------------------------------
def collect_table(plan: SweepPlan):
    """``rlhf_jax.report.SweepTable`` of the finished points (their ``summary.json``; a point
    that ran without an evaluation counts with no numbers); the others are ``missing``."""
    from rlhf_jax.report import build_sweep_table
    runs, missing = [], []
    for p in plan.points:
        rel = os.path.relpath(p.run_dir, plan.out)
        if point_complete(plan, p):
            summary_path = p.run_dir / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            runs.append({"values": p.values, "seed": p.seed, "dir": rel, "summary": summary})
        else:
            missing.append({"index": p.index, "values": dict(p.values), "seed": p.seed,
                            "dir": rel})
    return build_sweep_table(plan.spec.name, list(plan.axis_names), plan.grid(), runs,
                             seed_field=resolve_field(plan.spec.seed_field).path,
                             seeds=plan.seeds, missing=missing)


def write_results(plan: SweepPlan) -> Path:
    """Write ``results.json``, ``results.md`` and the plots from the finished points
    (``rlhf_jax.report.write_sweep_report``); returns the path of ``results.md``."""
    from rlhf_jax.report import write_sweep_report
    spec = plan.spec
    table = collect_table(plan)
    notes = (f"Base preset: `{spec.preset}`. " + (f"{spec.description}. " if spec.description
                                                   else "")
             + "Each run's own report (samples, training curves) is `runs/<run>/report.md`; "
             "the stage outputs a run used are the links in its directory (`point.json` lists "
             "them). Shared stages are stored once under `stages/<stage>-<address>/`.")
    return write_sweep_report(plan.out, table, title=f"Sweep {spec.name}",
                              metrics=spec.metrics,
                              plots=[(p.kind, p.params) for p in spec.plots], notes=notes)


def list_points(plan: SweepPlan) -> str:
    """A text table of every point: index, grid values, seed, status (``done``, ``started``
    or ``-``), its stage outputs (``*`` after a finished one) and run directory."""
    from rlhf_jax.pipeline.artifacts import StageFiles
    from rlhf_jax.report import format_value
    lines = []
    header = ["index", *plan.axis_names, resolve_field(plan.spec.seed_field).path,
              "status", "stages (* finished)", "run"]
    rows = []
    for p in plan.points:
        status = ("done" if point_complete(plan, p) else
                  "started" if p.run_dir.exists() else "-")
        stages = " ".join(
            f"{s}-{a[:8]}" + ("*" if StageFiles(plan.stage_dir(s, a).parent,
                                                plan.stage_dir(s, a).name).complete else "")
            for s, a in p.stages.items())
        rows.append([str(p.index), *(format_value(p.values[a]) for a in plan.axis_names),
                     str(p.seed), status, stages, os.path.relpath(p.run_dir, plan.out)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


__all__ = ["FieldRef", "resolve_field", "convert_value", "get_field", "with_fields",
           "GridAxis", "parse_grid", "SweepPlot", "SweepArm", "ARM_AXIS", "SweepSpec", "SWEEPS",
           "register_sweep", "arm_changes",
           "get_sweep", "base_config", "SweepPoint", "SweepPlan", "plan_sweep", "linked_stages",
           "result_config", "point_complete", "mark_point_complete", "prepare_point",
           "run_point", "run_sweep", "SweepResult", "collect_table", "write_results",
           "list_points", "plan_json"]
