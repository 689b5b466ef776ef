"""Command line: ``rlhf-jax <command> [--field value ...]`` (tyro over frozen dataclasses).

Commands:
  pipeline  every registered stage (SFT -> RM -> PPO, DPO from the same SFT model, judged
            evaluation and report; ``rlhf_jax.pipeline``), from a preset
            (``rlhf_jax.presets``) with any field overridden:
            ``rlhf-jax pipeline --preset tiny --ppo.iterations 5``.
  <stage>   one registered stage of the same configuration (``rlhf_jax.pipeline.registry``).
  chat      Fetch SmolLM2-135M-Instruct (or load ``--model-dir``), apply its chat template to
            a prompt and sample an answer with the jitted KV-cache sampler.

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
  chat       sample an answer from a chat model (default SmolLM2-135M-Instruct)

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
    from rlhf_jax.pipeline.config import PipelineConfig
    from rlhf_jax.presets import get_preset, with_stages

    preset = "smollm2-sentiment"
    rest = list(argv)
    if "--preset" in rest:
        i = rest.index("--preset")
        if i + 1 >= len(rest):
            raise SystemExit("--preset needs a name")
        preset = rest[i + 1]
        del rest[i:i + 2]
    rewards = []
    while "--reward" in rest:  # repeatable alias of --ppo.rewards
        i = rest.index("--reward")
        if i + 1 >= len(rest):
            raise SystemExit("--reward needs module:function[=weight]")
        rewards.append(rest[i + 1])
        del rest[i:i + 2]
    if rewards:
        rest += ["--ppo.rewards", *rewards]
    try:
        default = get_preset(preset)
    except KeyError as e:
        raise SystemExit(str(e)) from None
    if command != "pipeline":
        default = with_stages(default, command)
    return tyro.cli(PipelineConfig, default=default, args=rest,
                    prog=f"rlhf-jax {command}", description=f"preset {preset}")


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
    elif command == "pipeline" or command in stage_names():
        cfg = parse_pipeline_args(command, rest)  # pure Python: no JAX backend touched yet
        code = run_command(cfg)
        if code:
            raise SystemExit(code)
    else:
        raise SystemExit(f"unknown command {command!r}\n\n" + usage())


if __name__ == "__main__":
    main()
