"""Command line: ``rlhf-jax <command> [--field value ...]`` (tyro over frozen dataclasses).

Commands:
  pipeline  every registered stage (SFT -> RM -> PPO, DPO from the same SFT model, judged
            evaluation and report; ``rlhf_jax.pipeline``), from a preset
            (``rlhf_jax.presets``) with any field overridden:
            ``rlhf-jax pipeline --preset tiny --ppo.iterations 5``.
  <stage>   one registered stage of the same configuration (``rlhf_jax.pipeline.registry``).
  sweep     the pipeline over a grid of field values x seeds, stage outputs shared by content
            address, then mean ± s.e. over seeds per grid point (``rlhf_jax.sweeps``):
            ``rlhf-jax sweep --preset tiny --grid ppo.ppo.kl.init_kl_coef=0.05,0.2 --seeds 3``.
  chat      Fetch SmolLM2-135M-Instruct (or load ``--model-dir``), apply its chat template to
            a prompt and sample an answer with the jitted KV-cache sampler.
  plan      Per-device memory of each stage's compiled step for a model and a mesh, without
            weights, on fake CPU devices when the machine has too few (``rlhf_jax.plan``):
            ``rlhf-jax plan --policy.path llama3-8b --mesh.fsdp 32 --hbm-gib 95``.

Exit codes (``rlhf_jax.train.loop``): 0 done; 75 preempted (SIGTERM, checkpoint saved: run the
same command again); 76 a non-finite loss or gradient norm stopped training; 77 training
stalled; 1 any other error (a locked run directory, a changed configuration on resume, bad
data); 2 bad command-line arguments.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import tyro


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatArgs:
    """Sample a chat answer from a causal LM.

    Attributes:
      model_dir: HF checkpoint directory; default: SmolLM2-135M-Instruct fetched into the cache.
      cache_dir: where fetched assets live (default ``$RLHF_JAX_CACHE`` or ``~/.cache/rlhf_jax``).
      prompt: the user message.
      max_new_tokens: response length budget ``R``.
      temperature: sampling temperature; ``0`` means greedy.
      top_p: nucleus sampling threshold.
      seed: sampling seed.
    """

    model_dir: Path | None = None
    cache_dir: Path | None = None
    prompt: str = "What is reinforcement learning from human feedback? Answer in two sentences."
    max_new_tokens: int = 96
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def chat(args: ChatArgs) -> str:
    """Run ``ChatArgs``; prints and returns the decoded answer."""
    import jax
    import numpy as np

    from rlhf_jax.models.convert.hf import load_hf_checkpoint
    from rlhf_jax.models.convert.smollm2 import fetch_smollm2
    from rlhf_jax.models.tokenizer import load_tokenizer
    from rlhf_jax.rollout.sampler import SamplingConfig, make_sampler

    model_dir = args.model_dir or fetch_smollm2(args.cache_dir)
    tokenizer = load_tokenizer(model_dir)
    model, params = load_hf_checkpoint(model_dir)
    messages = [{"role": "user", "content": args.prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    prompt = np.asarray([ids], np.int32)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=args.temperature == 0,
                         temperature=args.temperature or 1.0, top_p=args.top_p,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    sampler = make_sampler(model, cfg)
    t0 = time.perf_counter()
    out = sampler(params, prompt, np.ones_like(prompt, bool), jax.random.key(args.seed))
    response = np.asarray(out.response[0])[np.asarray(out.response_mask[0])]
    dt = time.perf_counter() - t0
    text = tokenizer.decode(response, skip_special_tokens=True)
    print(f"model: {model_dir}\nuser: {args.prompt}\nassistant: {text}")
    print(f"[{len(response)} tokens in {dt:.1f} s including compilation]")
    return text


USAGE = """usage: rlhf-jax COMMAND [--preset NAME] [--FIELD VALUE ...]

commands:
  pipeline   every stage below, in order
{stages}
  sweep      the pipeline over a grid x seeds, shared stages (`rlhf-jax sweep --help`)
  chat       sample an answer from a chat model (default SmolLM2-135M-Instruct)
  plan       per-device memory of each stage on a mesh, compiled without weights
             (`rlhf-jax plan --help`)

presets: {presets} (default smollm2-sentiment); `rlhf-jax pipeline --help` lists every field.
`pipeline` runs the preset's stages; `--reward module:function[=weight]` (repeatable) adds a
host reward function to the RL stage.
A stage reads earlier stages' outputs from --out-dir. Exit codes: 0 done, 75 preempted
(rerun to continue), 76 non-finite training, 77 stalled training, 1 other errors.
"""


def usage() -> str:
    """The top-level help, with the registered stages and presets."""
    from rlhf_jax.pipeline.registry import stages
    from rlhf_jax.presets import PRESETS
    lines = "\n".join(f"  {s.name:<10} {s.description}" for s in stages().values())
    return USAGE.format(stages=lines, presets=", ".join(PRESETS))


def parse_pipeline_args(command: str, argv: list[str]):
    """``PipelineConfig`` for ``command`` from ``--preset`` and field overrides (tyro)."""
    from rlhf_jax.presets import get_preset, with_stages

    preset = "smollm2-sentiment"
    rest = list(argv)
    if "--preset" in rest:
        i = rest.index("--preset")
        if i + 1 >= len(rest):
            raise SystemExit("--preset needs a name")
        preset = rest[i + 1]
        del rest[i:i + 2]
    try:
        default = get_preset(preset)
    except KeyError as e:
        raise SystemExit(str(e)) from None
    if command != "pipeline":
        default = with_stages(default, command)
    return _override(default, rest, prog=f"rlhf-jax {command}", description=f"preset {preset}")


def _override(default, rest: list[str], *, prog: str, description: str):
    """``default`` (a ``PipelineConfig``) with the command-line field overrides ``rest``
    (tyro; ``--reward`` is a repeatable alias of ``--ppo.rewards``)."""
    from rlhf_jax.pipeline.config import PipelineConfig

    rest = list(rest)
    rewards = []
    while "--reward" in rest:  # repeatable alias of --ppo.rewards
        i = rest.index("--reward")
        if i + 1 >= len(rest):
            raise SystemExit("--reward needs module:function[=weight]")
        rewards.append(rest[i + 1])
        del rest[i:i + 2]
    if rewards:
        rest += ["--ppo.rewards", *rewards]
    return tyro.cli(PipelineConfig, default=default, args=rest, prog=prog,
                    description=description)


SWEEP_USAGE = """usage: rlhf-jax sweep (--sweep NAME | --preset NAME --grid PATH=V1,V2,...)
                      [--grid ...] [--seeds N] [--seed-field PATH] [--out DIR]
                      [--index I] [--list] [--report-only] [--metric PATTERN]
                      [--plot METRIC[:AXIS]] [--FIELD VALUE ...]

Run the pipeline for every point of the cartesian product of the grid axes x N seeds, each
stage output stored once under <out>/stages/<stage>-<address> (its configuration and inputs
hashed) and shared by the points that need it; then write <out>/results.json and
<out>/results.md: every summary number as mean ± s.e. over seeds per grid point
(s.e. = sample std / sqrt(n), shown for n >= 2), and plots in <out>/plots/. A named sweep
may also have arms (named sets of overrides, e.g. PPO at some KL coefficients and DPO at
some β): its points are the union of the arms, each times the grid and the seeds.

  --sweep NAME        a named sweep (base preset, grid, seeds, numbers, plots; below)
  --preset NAME       base pipeline preset (below); with --sweep: replaces its preset
  --grid PATH=V1,V2   a grid axis: a PipelineConfig field path (as the pipeline overrides
                      it, e.g. ppo.ppo.kl.init_kl_coef) and its values, converted to the
                      field's type; PATH=[JSON list] for values with commas. Repeatable; with
                      --sweep: adds an axis or replaces the one of that path.
  --seeds N           seeds per grid point: the seed field's base value + 0..N-1 (default 1,
                      or the named sweep's)
  --seed-field PATH   the int field the seeds set (default seed, which every stage reads:
                      each seed is a whole independent pipeline)
  --out DIR           sweep directory (alias --out-dir; default runs/sweeps/<name>)
  --index I           run only point I (and the stages it needs), e.g. one job per point;
                      repeatable. The table is rebuilt from every finished point.
  --list              print the points with their indices and status; run nothing
  --report-only       rebuild results.json / results.md / plots from finished points
  --metric PATTERN    summary numbers in results.md's main table (fnmatch, repeatable;
                      e.g. 'ppo.*'); results.json has all of them
  --plot METRIC[:AXIS]  also plot a summary number against a grid axis (default the first)
  --FIELD VALUE       any pipeline field override, applied to every point
                      (`rlhf-jax pipeline --help` lists them)

Exit codes as `pipeline`: 0 done; 75 preempted (rerun the same command: finished points and
stages are skipped, the interrupted stage continues from its checkpoint); 76 / 77 a point's
training diverged / stalled (the other points still ran); 1 other errors.

{names}
"""


@dataclasses.dataclass(frozen=True)
class SweepArgs:
    """A parsed ``rlhf-jax sweep`` command: the plan (``rlhf_jax.sweeps.SweepPlan``), the
    selected point indices (``None``: all) and the mode."""

    plan: object
    indices: tuple[int, ...] | None = None
    list: bool = False
    report_only: bool = False


def sweep_usage() -> str:
    """``rlhf-jax sweep --help``, with the named sweeps and presets."""
    import textwrap

    from rlhf_jax.presets import PRESETS
    from rlhf_jax.sweeps import SWEEPS
    names = "\n".join(textwrap.fill(f"{what}: {', '.join(items) or '-'}", width=90,
                                     subsequent_indent="  ")
                       for what, items in (("named sweeps", SWEEPS), ("presets", PRESETS)))
    return SWEEP_USAGE.format(names=names)


def parse_sweep_args(argv: list[str]) -> SweepArgs:
    """The sweep for ``rlhf-jax sweep ARGS``: its options (``SWEEP_USAGE``), the base
    configuration (named sweep or preset, its overrides, then the ``--FIELD VALUE``
    overrides) and the plan. Pure Python: no JAX backend is touched.

    Raises:
      SystemExit: bad arguments, an unknown sweep or preset, a bad grid path or value, a point
        the configuration checks refuse, an index out of range (the message names it).
    """
    import argparse

    from rlhf_jax import sweeps

    parser = argparse.ArgumentParser(prog="rlhf-jax sweep", add_help=False, allow_abbrev=False)
    parser.add_argument("--sweep")
    parser.add_argument("--preset")
    parser.add_argument("--grid", action="append", default=[])
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--seed-field")
    parser.add_argument("--out", "--out-dir", dest="out")
    parser.add_argument("--index", type=int, action="append")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--metric", action="append", default=[])
    parser.add_argument("--plot", action="append", default=[])
    parser.add_argument("-h", "--help", action="store_true")
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as e:
        raise SystemExit(f"rlhf-jax sweep: bad arguments ({e.code}); see rlhf-jax sweep --help")
    if args.help:
        print(sweep_usage())
        raise SystemExit(0)
    try:
        if args.sweep:
            spec = sweeps.get_sweep(args.sweep)
        else:
            spec = sweeps.SweepSpec(name="", preset=args.preset or "smollm2-sentiment")
        axes = list(spec.axes)
        for text in args.grid:
            axis = sweeps.parse_grid(text)
            axes = [a for a in axes if a.path != axis.path] + [axis]
        changes = {"grid": tuple(axes)}
        if args.preset:
            changes["preset"] = args.preset
        if args.seeds is not None:
            changes["seeds"] = args.seeds
        if args.seed_field:
            changes["seed_field"] = args.seed_field
        if args.metric:
            changes["metrics"] = tuple(args.metric)
        plots = list(spec.plots)
        for text in args.plot:
            metric, _, axis = text.partition(":")
            plots.append(sweeps.SweepPlot("metric_vs_axis", {"metric": metric.strip(),
                                                             "axis": axis.strip() or None}))
        changes["plots"] = tuple(plots)
        spec = dataclasses.replace(spec, **changes)
        default = sweeps.base_config(spec)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"rlhf-jax sweep: {e.args[0] if isinstance(e, KeyError) else e}") from None
    base = _override(default, rest, prog="rlhf-jax sweep",
                     description=f"sweep {spec.name or spec.preset}: field overrides")
    if not spec.name:
        spec = dataclasses.replace(spec, name=base.name)
    out = Path(args.out) if args.out else Path("runs/sweeps") / spec.name
    try:
        plan = sweeps.plan_sweep(spec, base, out)
        indices = None
        if args.index:
            indices = tuple(dict.fromkeys(args.index))
            for i in indices:
                plan.point(i)
    except (ValueError, IndexError) as e:
        raise SystemExit(f"rlhf-jax sweep: {e}") from None
    return SweepArgs(plan=plan, indices=indices, list=args.list, report_only=args.report_only)


def sweep_command(argv: list[str]) -> int:
    """Run ``rlhf-jax sweep ARGS``; returns the exit code (module docstring)."""
    import logging

    from rlhf_jax import sweeps

    args = parse_sweep_args(argv)
    plan = args.plan
    if args.list:
        print(sweeps.list_points(plan))
        return 0
    if args.report_only:
        print(f"results: {sweeps.write_results(plan)}")
        return 0
    from rlhf_jax.pipeline import StagePreempted
    from rlhf_jax.sharding import initialize_distributed
    from rlhf_jax.train.loop import exit_code

    initialize_distributed()
    try:
        result = sweeps.run_sweep(plan, args.indices)
    except StagePreempted as e:
        logging.getLogger("rlhf_jax").error("%s", e)
        return exit_code(e)
    if result.report is not None:
        print(f"results: {result.report}")
    return result.exit_code


PLAN_DESCRIPTION = """Per-device memory of each stage's jitted step (sft, rm, dpo, ppo) for a model
and a device mesh, before renting the devices. The model is a named architecture
(--policy.path {names}) or an HF checkpoint directory (only its config.json is read); its
parameters, optimizer state and batches are abstract (jax.eval_shape: no weight is
allocated). Each step is built with the trainers' own code and shardings, lowered and
compiled for the mesh, and XLA's memory analysis of the compiled program gives arguments,
outputs and temporaries per device; shard arithmetic splits them into params, optimizer
state, frozen models (reference, reward), inputs and the PPO sampler's KV cache.

Fake devices: a mesh needs --devices N devices (default: the product of the mesh axes).
When this process has fewer, the command runs itself again in a subprocess with
JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=N: N fake CPU
devices, compiled by XLA's CPU compiler (arguments and outputs are exact, temporaries an
estimate of what a TPU or GPU compiler allocates). Compiling an 8B model's PPO iteration
takes tens of seconds on a laptop CPU.

--hbm-gib G marks what fits in G GiB per device (TPU v5p: 95, v4: 32, v5e: 16, H100: 80)
and searches each stage's largest batch that fits, compiling a few batch sizes.
Cloud TPU slice names count TensorCores: v5p-64 is 32 chips and v4-32 is 16 chips, and JAX
sees one device per chip (megacore), so plan them with --devices 32 and --devices 16.
"""


def parse_plan_args(argv: list[str]):
    """``PlanConfig`` from ``rlhf-jax plan ARGS`` (tyro; pure Python, no JAX backend)."""
    from rlhf_jax.models.architectures import architecture_names
    from rlhf_jax.plan import PlanConfig

    return tyro.cli(PlanConfig, args=list(argv), prog="rlhf-jax plan",
                    description=PLAN_DESCRIPTION.format(names=" | ".join(architecture_names())))


def plan_command(argv: list[str]) -> int:
    """Run ``rlhf-jax plan ARGS``: print the table (or ``--json``) and return 0; re-executed
    on fake CPU devices when this process has fewer devices than the mesh (``PLAN_DESCRIPTION``).

    Raises:
      SystemExit: bad arguments, an unknown architecture, a mesh that does not divide the
        model or the batch (the message names them).
    """
    import json
    import os
    import subprocess
    import sys

    from rlhf_jax import plan as planner

    from rlhf_jax.models.architectures import resolve_architecture

    try:
        cfg = parse_plan_args(argv)
        resolve_architecture(cfg.policy.path)  # an unknown name fails before any re-execution
    except ValueError as e:
        raise SystemExit(f"rlhf-jax plan: {e}") from None
    import jax
    n = cfg.num_devices
    if jax.device_count() < n:
        if os.environ.get(planner.CHILD_ENV):
            raise SystemExit(f"rlhf-jax plan: {n} fake devices were asked for, this process has "
                             f"{jax.device_count()} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
        print(f"rlhf-jax plan: {jax.device_count()} device(s) here, the mesh needs {n}: "
              f"compiling on {n} fake CPU devices in a subprocess", file=sys.stderr, flush=True)
        return subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "plan", *argv],
                              env=planner.fake_device_env(n)).returncode
    log = None if cfg.json else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        result = planner.make_plan(cfg, log=log)
    except ValueError as e:
        raise SystemExit(str(e) if str(e).startswith("plan:") else f"rlhf-jax plan: {e}") from None
    print(json.dumps(planner.plan_to_dict(result), indent=1) if cfg.json
          else planner.format_plan(result))
    return 0


def run_command(cfg) -> int:
    """Run the pipeline for ``cfg`` and return the process exit code (module docstring): a
    preemption, a non-finite or a stalled stage are expected outcomes with their own codes,
    logged in one line; anything else propagates (exit code 1 with its traceback)."""
    import logging

    from rlhf_jax.pipeline import StagePreempted, run_pipeline
    from rlhf_jax.sharding import initialize_distributed
    from rlhf_jax.train.guards import NonFiniteLossError, TrainingStalledError
    from rlhf_jax.train.loop import exit_code

    initialize_distributed()  # multi-host (env / TPU / SLURM) before any JAX call; else no-op
    try:
        run_pipeline(cfg)
    except (StagePreempted, NonFiniteLossError, TrainingStalledError) as e:
        logging.getLogger("rlhf_jax").error("%s", e)
        return exit_code(e)
    return exit_code(None)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``rlhf-jax``; exits with the codes of the module docstring."""
    import sys

    from rlhf_jax.pipeline.registry import stage_names

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command == "chat":
        chat(tyro.cli(ChatArgs, args=rest, prog="rlhf-jax chat"))
    elif command == "sweep":
        code = sweep_command(rest)
        if code:
            raise SystemExit(code)
    elif command == "plan":
        code = plan_command(rest)
        if code:
            raise SystemExit(code)
    elif command == "pipeline" or command in stage_names():
        cfg = parse_pipeline_args(command, rest)  # pure Python: no JAX backend touched yet
        code = run_command(cfg)
        if code:
            raise SystemExit(code)
    else:
        raise SystemExit(f"unknown command {command!r}\n\n" + usage())


if __name__ == "__main__":
    main()
