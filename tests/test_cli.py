"""The ``rlhf-jax`` command line: overrides reach the ``PipelineConfig`` (everything else stays
the preset's), stage commands restrict ``stages``, errors and usage text, dispatch of
``pipeline`` / stage / ``chat`` commands, and one real ``chat`` on SmolLM2 (slow, only with
the model already in the cache)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from rlhf_jax import cli
from rlhf_jax.cli import ChatArgs, main, parse_pipeline_args
from rlhf_jax.pipeline import stage_names
from rlhf_jax.presets import PRESETS, tiny

replace = dataclasses.replace


def test_overrides_reach_the_config_and_the_rest_is_the_preset():
    cfg = parse_pipeline_args("pipeline", [
        "--preset", "tiny", "--ppo.iterations", "7", "--rm.optimizer.lr", "0.5",
        "--data.domains", "tweets", "editorials", "--out-dir", "/x"])
    assert cfg.ppo.iterations == 7
    assert cfg.rm.optimizer.lr == 0.5
    assert cfg.data.domains == ("tweets", "editorials")
    assert cfg.out_dir == Path("/x")
    t = tiny()
    expected = replace(t, out_dir=Path("/x"), ppo=replace(t.ppo, iterations=7),
                       rm=replace(t.rm, optimizer=replace(t.rm.optimizer, lr=0.5)),
                       data=replace(t.data, domains=("tweets", "editorials")))
    assert cfg == expected  # every other field (nested ones included) is tiny()'s


def test_deeply_nested_flags_and_booleans():
    cfg = parse_pipeline_args("pipeline", [
        "--preset", "tiny", "--no-resume", "--ppo.ppo.sampling.max-new-tokens", "5",
        "--ppo.ppo.kl.init-kl-coef", "0.2", "--mesh.data", "2", "--policy.frozen-layers", "1",
        "--seed", "3", "--no-tensorboard"])
    t = tiny()
    ppo = replace(t.ppo.ppo, sampling=replace(t.ppo.ppo.sampling, max_new_tokens=5),
                  kl=replace(t.ppo.ppo.kl, init_kl_coef=0.2))
    assert cfg == replace(t, resume=False, seed=3, tensorboard=False,
                          ppo=replace(t.ppo, ppo=ppo), mesh=replace(t.mesh, data=2),
                          policy=replace(t.policy, frozen_layers=1))


def test_optional_nested_model_keeps_preset_values():
    # ``policy.random_model`` is Optional: tyro selects it with a subcommand, and the
    # preset's architecture stays the default of every field not given.
    cfg = parse_pipeline_args("pipeline", ["--preset", "tiny", "policy.random-model:model-config",
                                           "--policy.random-model.d-model", "32"])
    assert cfg.policy.random_model == replace(tiny().policy.random_model, d_model=32)


@pytest.mark.parametrize("command", ["sft", "rm", "ppo", "dpo", "eval"])
def test_stage_command_restricts_stages(command):
    cfg = parse_pipeline_args(command, ["--preset", "tiny", "--sft.steps", "9"])
    assert cfg.stages == (command,)
    assert cfg == replace(tiny(), stages=(command,), sft=replace(tiny().sft, steps=9))


def test_pipeline_command_runs_every_stage_and_default_preset():
    assert parse_pipeline_args("pipeline", ["--preset", "tiny"]).stages == stage_names()
    assert stage_names() == ("sft", "rm", "ppo", "dpo", "eval")
    cfg = parse_pipeline_args("pipeline", [])
    assert cfg == PRESETS["smollm2-sentiment"]()


def test_unknown_preset_lists_presets():
    with pytest.raises(SystemExit) as info:
        parse_pipeline_args("pipeline", ["--preset", "nope"])
    message = str(info.value.code)
    assert "'nope'" in message
    for name in PRESETS:
        assert name in message
    with pytest.raises(SystemExit, match="--preset needs a name"):
        parse_pipeline_args("pipeline", ["--preset"])


def test_unknown_field_exits_with_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse_pipeline_args("pipeline", ["--preset", "tiny", "--ppo.iteratons", "3"])
    assert info.value.code != 0
    assert "ppo.iteratons" in capsys.readouterr().err.replace("\u2500", "")


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_main_prints_usage(argv, capsys):
    main(argv)
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhf-jax COMMAND")
    for word in ("pipeline", "chat", *PRESETS):
        assert word in out
    for stage in stage_names():  # the registry's stages, with their descriptions
        assert re.search(rf"^  {stage} +\S", out, re.M), stage


def test_main_unknown_command():
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert "unknown command 'train'" in str(info.value.code)
    assert "usage: rlhf-jax COMMAND" in str(info.value.code)


def test_pipeline_help_lists_fields_with_preset_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        parse_pipeline_args("pipeline", ["--preset", "tiny", "--help"])
    assert info.value.code == 0
    out = re.sub(r"[\u2500-\u257f]", " ", capsys.readouterr().out)
    assert "--ppo.iterations" in out and "--rm.optimizer.lr" in out
    assert "preset tiny" in out


def test_main_dispatches_pipeline_and_stage_commands(monkeypatch):
    import rlhf_jax.pipeline as pipeline
    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline", seen.append)
    main(["pipeline", "--preset", "tiny", "--ppo.iterations", "7"])
    main(["dpo", "--preset", "tiny", "--out-dir", "/tmp/somewhere"])
    assert seen[0] == replace(tiny(), ppo=replace(tiny().ppo, iterations=7))
    assert seen[1] == replace(tiny(), stages=("dpo",), out_dir=Path("/tmp/somewhere"))


@pytest.mark.parametrize("error, code", [("preempted", 75), ("non_finite", 76), ("stalled", 77)])
def test_main_exit_codes(monkeypatch, error, code):
    import rlhf_jax.pipeline as pipeline
    from rlhf_jax.train.guards import NonFiniteLossError, TrainingStalledError

    def fail(cfg):
        raise {"preempted": pipeline.StagePreempted("ppo: stopped by SIGTERM at step 3"),
               "non_finite": NonFiniteLossError(2, "sft/loss", float("nan")),
               "stalled": TrainingStalledError("sft: stalled")}[error]
    monkeypatch.setattr(pipeline, "run_pipeline", fail)
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "--preset", "tiny"])
    assert info.value.code == code


def test_chat_arguments(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "chat", seen.append)
    main(["chat", "--max-new-tokens", "4", "--prompt", "Hi there", "--temperature", "0.5",
          "--top-p", "0.9", "--seed", "2", "--model-dir", "/m"])
    main(["chat"])
    assert seen == [ChatArgs(max_new_tokens=4, prompt="Hi there", temperature=0.5, top_p=0.9,
                             seed=2, model_dir=Path("/m")),
                    ChatArgs()]
    with pytest.raises(SystemExit):
        main(["chat", "--max-new-tokens", "many"])


def _smollm2_cached() -> bool:
    from rlhf_jax.assets import default_cache_dir
    return (default_cache_dir() / "SmolLM2-135M-Instruct" / ".rlhf_jax_complete").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_cached(), reason="SmolLM2-135M-Instruct is not in the cache")
def test_chat_with_smollm2(capsys):
    text = cli.chat(ChatArgs(max_new_tokens=4, prompt="What is the capital of France?"))
    out = capsys.readouterr().out
    assert isinstance(text, str) and text.strip()
    assert f"assistant: {text}" in out
    n = int(re.search(r"\[(\d+) tokens in", out).group(1))
    assert 1 <= n <= 4
