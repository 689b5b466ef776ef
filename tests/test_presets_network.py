"""The presets for users with a network: ``tldr-pythia`` (Huang et al. 2024's TL;DR settings
with Pythia) and ``gemma3-sentiment`` (the main job's task with Gemma 3 1B-it).

* each builds a valid ``PipelineConfig`` through the registry and the command line;
* the key values are the paper's / the main job's numbers, written here independently of
  the preset, and every ``preset field`` / ``preset value`` row of the docs' tables is what
  the preset holds;
* without the checkpoint the run stops before any stage starts, as ``tldr`` and
  ``gpt2-sentiment`` do (with an explicit path: a ``FileNotFoundError`` naming it);
* with a tiny random checkpoint saved by transformers at the preset's default path, the run
  context builds: GPT-NeoX with a Pythia-style tokenizer renders TL;DR records as plain text,
  and Gemma 3 with a Gemma-style chat template renders the sentiment records as chats once
  the documented tokenizer fix is applied (and fails clearly without it).

No network: the HF data sources of the TL;DR presets are replaced by local JSONL files, and
the hub is off (``tests/conftest.py``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

import rlhf_jax.presets as presets_module
from rlhf_jax.cli import parse_pipeline_args
from rlhf_jax.pipeline import PipelineConfig, run_pipeline, stage_names
from rlhf_jax.pipeline.config import PolicyConfig
from rlhf_jax.presets import (PRESETS, gemma3_sentiment, get_preset, smollm2_sentiment, tldr,
                              tldr_pythia)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
NEW_PRESETS = {"tldr-pythia": "tldr.md", "gemma3-sentiment": "gemma_sentiment.md"}
#: every preset that reads an HF checkpoint the user downloads (the old two and the new two)
NETWORK_PRESETS = ("tldr", "gpt2-sentiment", "tldr-pythia", "gemma3-sentiment")
PYTHIA_SECTION = "## Pythia with the settings of Huang et al. 2024 (`tldr-pythia`)"


def _cache_args() -> list[str]:
    env = os.environ.get("RLHF_JAX_CACHE")
    return ["--cache-dir", env] if env else []


# ---- registration and documentation -------------------------------------------------------
@pytest.mark.parametrize("name, doc", sorted(NEW_PRESETS.items()))
def test_preset_is_registered_resolvable_and_documented(name, doc):
    cfg = get_preset(name)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.name == name and cfg.out_dir == Path("runs") / name
    assert cfg.stages == stage_names()
    assert parse_pipeline_args("pipeline", ["--preset", name]) == cfg
    assert PRESETS[name] in (tldr_pythia, gemma3_sentiment)
    assert f"``{name}``" in presets_module.__doc__
    readme = (EXPERIMENTS / "README.md").read_text()
    assert f"| `{name}` |" in readme and f"]({doc}" in readme
    text = (EXPERIMENTS / doc).read_text()
    assert f"rlhf-jax pipeline --preset {name}" in text
    assert f"tpu_scripts/launch.sh --preset {name} --fsdp 8" in text
    # the download line of the other docs, into the directory the preset reads
    path = re.escape(str(cfg.policy.path))
    assert re.search(rf"\.venv/bin/hf download \S+ .*--local-dir {path}", text)


@pytest.mark.parametrize("name", sorted(NEW_PRESETS))
def test_batches_divide_a_mesh_of_eight_devices(name):
    """The docs launch both presets with ``--fsdp 8``: every global batch, and every PPO
    minibatch, must split evenly over 8 batch shards."""
    c = get_preset(name)
    rollout = c.ppo.batch_size * c.ppo.ppo.num_samples
    assert rollout % c.ppo.ppo.num_minibatches == 0
    for rows in (c.sft.batch_size, c.rm.batch_size, c.dpo.batch_size, c.eval.batch_size,
                 rollout // c.ppo.ppo.num_minibatches):
        assert rows % 8 == 0, rows


# ---- tldr-pythia: Huang et al. 2024 ---------------------------------------------------------
# The authors' numbers (vwxyzjn/summarize_from_feedback_details, 8 GPUs per run).
HUANG_LR, HUANG_ADAM_EPS, TORCH_ADAMW_DECAY = 3e-6, 1e-5, 0.01
SFT_POSTS, SFT_BATCH = 116_722, 128  # trl-lib/tldr train has the same count
PAIRS_HUANG, PAIRS_TRL, PAIR_BATCH = 92_832, 92_858, 64
EPISODES, ROLLOUT = 1_000_000, 512
RESPONSE_TOKENS, TEMPERATURE, KL_COEF = 53, 0.7, 0.05


def test_tldr_pythia_has_the_settings_of_huang_et_al():
    c = tldr_pythia()
    # bf16 mixed precision; every block trains; the reward model keeps the full trunk
    assert c.policy == PolicyConfig(source="hf", path=Path("checkpoints/pythia-1b-deduped"),
                                    dtype="bfloat16")
    assert c.data == tldr().data  # the same task and data as `tldr`
    assert c.task_spec == "files"
    for opt in (c.sft.optimizer, c.rm.optimizer, c.ppo.optimizer, c.ppo.value_optimizer,
                c.dpo.optimizer):
        assert (opt.lr, opt.eps, opt.weight_decay, opt.warmup_steps) == (
            HUANG_LR, HUANG_ADAM_EPS, TORCH_ADAMW_DECAY, 0)
    for opt in (c.sft.optimizer, c.rm.optimizer, c.dpo.optimizer):
        assert opt.schedule == "cosine" and opt.end_lr_ratio == 0.0
    # one epoch of SFT, of RM and of DPO training
    assert c.sft.batch_size == SFT_BATCH and abs(c.sft.steps * SFT_BATCH - SFT_POSTS) < SFT_BATCH
    for stage in (c.rm, c.dpo):
        assert stage.batch_size == PAIR_BATCH
        for pairs in (PAIRS_HUANG, PAIRS_TRL):
            assert abs(stage.steps * PAIR_BATCH - pairs) < PAIR_BATCH
    # PPO: 1M episodes in rollouts of 512, one minibatch, 4 epochs
    p = c.ppo.ppo
    assert c.ppo.init == "sft" and c.ppo.reward_model_weight == 1.0
    assert c.ppo.batch_size * p.num_samples == ROLLOUT
    assert EPISODES - ROLLOUT < c.ppo.iterations * ROLLOUT <= EPISODES
    assert (p.num_ppo_epochs, p.num_minibatches) == (4, 1)
    for opt in (c.ppo.optimizer, c.ppo.value_optimizer):  # linear to 0 over every update
        assert opt.schedule == "linear" and opt.end_lr_ratio == 0.0
        assert opt.total_steps == c.ppo.iterations * p.num_ppo_epochs * p.num_minibatches
    assert p.sampling.max_new_tokens == RESPONSE_TOKENS and c.eval.max_new_tokens == RESPONSE_TOKENS
    assert p.sampling.temperature == TEMPERATURE and p.sampling.min_new_tokens == 0
    assert (p.kl.kind, p.kl.init_kl_coef, p.kl_penalty, p.kl_estimator) == (
        "fixed", KL_COEF, "reward", "k1")
    assert (p.gamma, p.lam, p.clip_eps, p.clip_eps_value, p.vf_coef) == (1.0, 0.95, 0.2, 0.2, 0.1)
    assert p.advantage == "gae" and p.value_model == "separate"  # critic initialised from the RM
    assert p.whiten_rewards is False and p.whiten_advantages is None  # GAE's default: whitened
    assert p.missing_eos_penalty == 1.0  # the paper's -1 score for a summary without EOS
    # DPO
    assert (c.dpo.dpo.beta, c.dpo.dpo.loss_type) == (0.05, "sigmoid")
    # validation summaries nearly greedy (temperature 0.01 in the paper)
    assert c.eval.temperature == 0.0


def test_tldr_keeps_its_settings_and_shares_the_data():
    """Factoring the data out of ``tldr`` changed nothing in it."""
    c = tldr()
    assert c.data.sft == "hf:trl-lib/tldr:train" and c.data.prompts == "hf:trl-lib/tldr:train"
    assert c.data.preferences == "hf:trl-lib/tldr-preference:train"
    assert c.data.eval_preferences == "hf:trl-lib/tldr-preference:validation"
    assert c.data.eval_prompts == "hf:trl-lib/tldr:validation"
    assert (c.data.buckets, c.data.prompt_buckets) == ((512, 640), (512,))
    assert c.policy.path == Path("checkpoints/Qwen2-0.5B") and c.ppo.ppo.num_minibatches == 2


# ---- gemma3-sentiment: the main job with Gemma 3 ---------------------------------------------
def test_gemma3_sentiment_is_the_main_job_on_gemma():
    g, m = gemma3_sentiment(), smollm2_sentiment()
    assert g.policy == PolicyConfig(source="hf", path=Path("checkpoints/gemma-3-1b-it"),
                                    dtype="bfloat16")  # every block trains, full reward trunk
    assert g.task_spec == "sentiment"
    # the main job's records; only the length buckets are wider (Gemma's chat markup)
    assert dataclasses.replace(g.data, buckets=m.data.buckets,
                               prompt_buckets=m.data.prompt_buckets) == m.data
    assert g.data.buckets[0] == m.data.buckets[0]
    assert g.data.prompt_buckets[0] == m.data.prompt_buckets[0]
    # the main job's sampling, KL and PPO settings
    gp, mp = g.ppo.ppo, m.ppo.ppo
    assert gp.sampling == mp.sampling and gp.kl == mp.kl
    for field in ("num_ppo_epochs", "num_minibatches", "vf_coef", "gamma", "lam", "clip_eps",
                  "clip_eps_value", "advantage", "value_model", "whiten_rewards",
                  "whiten_advantages", "missing_eos_penalty", "kl_estimator", "kl_penalty"):
        assert getattr(gp, field) == getattr(mp, field), field
    assert g.rm.step == m.rm.step and g.dpo.dpo == m.dpo.dpo
    for field in ("max_new_tokens", "min_new_tokens", "temperature", "num_samples"):
        assert getattr(g.eval, field) == getattr(m.eval, field), field
    # sized for an accelerator: more data per stage than the CPU job
    assert g.sft.steps * g.sft.batch_size > m.sft.steps * m.sft.batch_size
    assert g.ppo.iterations * g.ppo.batch_size > m.ppo.iterations * m.ppo.batch_size


# ---- the docs' tables are the presets ---------------------------------------------------------
def _table_fields(text: str) -> list[tuple[str, str]]:
    """``(field, value)`` of every table row whose ``preset field`` and ``preset value`` cells
    are single backticked literals (``—`` rows are settings the library has no field for)."""
    out, cols = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            cols = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cols is None:  # a header row
            cols = (cells.index("preset field"), cells.index("preset value")) \
                if "preset field" in cells else ()
            continue
        if not cols or set(cells[0]) <= set("-: "):
            continue
        field, value = (re.fullmatch(r"`([^`]+)`", cells[i]) for i in cols)
        if field and value:
            out.append((field.group(1), value.group(1)))
    return out


def _resolve(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _same(value, text: str) -> bool:
    if isinstance(value, bool) or value is None:
        return text == repr(value)
    if isinstance(value, (int, float)):
        return float(text) == float(value)
    if isinstance(value, Path):
        return text == str(value)
    if isinstance(value, str):
        return text == value
    return text == repr(value)


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


@pytest.mark.parametrize("name, doc, heading, min_rows", [
    ("tldr-pythia", "tldr.md", PYTHIA_SECTION, 35),
    ("gemma3-sentiment", "gemma_sentiment.md", "## Settings", 35),
])
def test_docs_tables_match_the_preset(name, doc, heading, min_rows):
    cfg = get_preset(name)
    rows = _table_fields(_section((EXPERIMENTS / doc).read_text(), heading))
    assert len(rows) >= min_rows, rows
    wrong = [(f, v, _resolve(cfg, f)) for f, v in rows if not _same(_resolve(cfg, f), v)]
    assert not wrong, wrong


# ---- without the checkpoint -----------------------------------------------------------------
def _stage_outputs(out: Path) -> list[Path]:
    return [out / s for s in stage_names() if (out / s).exists()]


@pytest.mark.parametrize("name", NETWORK_PRESETS)
def test_missing_checkpoint_at_an_explicit_path_is_named(name, tmp_path):
    missing, out = tmp_path / "no-such-checkpoint", tmp_path / "out"
    cfg = parse_pipeline_args("pipeline", ["--preset", name, "--policy.path", str(missing),
                                           "--out-dir", str(out), "--no-tensorboard"])
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        run_pipeline(cfg)
    assert not _stage_outputs(out)


@pytest.mark.parametrize("name", NETWORK_PRESETS)
def test_missing_checkpoint_at_the_default_path_stops_before_any_stage(name, tmp_path, monkeypatch):
    """The presets' default (relative) paths fail the same way for the old and the new presets:
    before any stage, nothing trained. The hub is off (conftest), so nothing is fetched."""
    monkeypatch.chdir(tmp_path)
    cfg = parse_pipeline_args("pipeline", ["--preset", name, "--no-tensorboard"])
    assert not Path(cfg.policy.path).exists()
    with pytest.raises(OSError):
        run_pipeline(cfg)
    assert not _stage_outputs(tmp_path / cfg.out_dir)


@pytest.mark.parametrize("name", NETWORK_PRESETS)
def test_missing_checkpoint_at_the_default_path_is_named(name, tmp_path, monkeypatch):
    """A relative default path is never read as a hub repository id: the error names it."""
    monkeypatch.chdir(tmp_path)
    cfg = parse_pipeline_args("pipeline", ["--preset", name, "--no-tensorboard"])
    with pytest.raises(FileNotFoundError) as info:
        run_pipeline(cfg)
    assert str(cfg.policy.path) in str(info.value)


# ---- tiny checkpoints at the presets' default paths --------------------------------------------
def _byte_bpe(corpus: list[str], specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


_TLDR_POST = ("SUBREDDIT: r/movies\n\nTITLE: Saw a film twice this week\n\nPOST: I went to the "
              "cinema on Monday and again on Friday because the first time was great.\n\nTL;DR:")


def _save_pythia_like(directory: Path) -> None:
    """A 2-block GPT-NeoX (partial rotary, parallel residual, untied head) and a byte-level BPE
    tokenizer laid out like Pythia's: ``<|endoftext|>`` is BOS, EOS and unknown, no pad token,
    no chat template."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast
    tok = _byte_bpe([_TLDR_POST, " I watched a great film twice.", " Two cinema trips."],
                    ["<|endoftext|>"], 300)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>"
                            ).save_pretrained(directory)
    cfg = transformers.GPTNeoXConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=1024, rotary_pct=0.25,
                                     use_parallel_residual=True, tie_word_embeddings=False,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(directory)


def _write_tldr_files(directory: Path) -> dict[str, Path]:
    import json
    rows = {
        "sft": {"prompt": _TLDR_POST, "completion": " I watched a great film twice."},
        "preferences": {"prompt": _TLDR_POST, "chosen": " I watched a great film twice.",
                        "rejected": " Two cinema trips."},
        "prompts": {"prompt": _TLDR_POST},
    }
    paths = {}
    for kind, row in rows.items():
        paths[kind] = directory / f"{kind}.jsonl"
        paths[kind].write_text("\n".join(json.dumps(row) for _ in range(8)) + "\n")
    return paths


def test_tldr_pythia_with_a_tiny_gpt_neox_renders_plain_tldr_records(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from rlhf_jax.pipeline.run import Run
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / tldr_pythia().policy.path  # the preset's default path, relative to cwd
    ckpt.mkdir(parents=True)
    _save_pythia_like(ckpt)
    f = _write_tldr_files(tmp_path)
    cfg = parse_pipeline_args("pipeline", [
        "--preset", "tldr-pythia", "--no-tensorboard", "--data.sft", str(f["sft"]),
        "--data.preferences", str(f["preferences"]), "--data.eval-preferences",
        str(f["preferences"]), "--data.prompts", str(f["prompts"]), "--data.eval-prompts",
        str(f["prompts"])])
    run = Run.create(cfg)
    try:
        tok = run.tokenizer
        eos = tok.convert_tokens_to_ids("<|endoftext|>")
        assert tok.eos_token_id == eos and tok.pad_token_id == eos  # padding with EOS
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        prompt, summary = enc(_TLDR_POST), enc(" I watched a great film twice.")
        ex = run.sft_dataset().examples[0]
        assert list(ex.tokens) == prompt + summary + [eos]  # no chat markup, no BOS
        assert list(ex.loss_mask) == [False] * len(prompt) + [True] * (len(summary) + 1)
        pair = run.preference_dataset("preferences", 2).examples[0]
        assert list(pair.prompt) == prompt and all(int(r[-1]) == eos for r in pair.responses)
        assert list(run.prompt_dataset("prompts").examples[0]) == prompt
        sampling = run.sampling(cfg.ppo.ppo.sampling)
        assert (sampling.eos_token_id, sampling.pad_token_id) == (eos, eos)
        model, _ = run.initial_policy()
        assert model.cfg.arch == "gpt_neox" and model.cfg.parallel_residual
        assert model.cfg.rotary_dim == 4 and not model.cfg.tie_embeddings  # 25% of head dim 16
        assert model.cfg.dtype == "bfloat16" and model.cfg.param_dtype == "float32"
    finally:
        run.close()


#: Gemma 3's turn layout (written for this test, same shape as the released template): no
#: system role, a system message is prefixed to the first user turn; the assistant is the
#: "model" turn; every turn ends with <end_of_turn> and a newline.
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') }}"
    "{{ m['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def _save_gemma3_like(directory: Path) -> None:
    """A 2-block Gemma 3 text model (one sliding, one global layer) and a byte-level BPE
    tokenizer with Gemma's special tokens in Gemma's order (``<pad>`` 0, ``<eos>`` 1, ``<bos>``
    2, ...) and EOS ``<eos>``, as the hub's tokenizer names it."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast
    corpus = ["You write short reviews. Write a sentence from a movie review.",
              "This film is a delight from start to finish.", "The plot was dull and slow."]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    fast = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(corpus, specials, 300),
                                   bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>",
                                   additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    fast.chat_template = GEMMA_STYLE_TEMPLATE
    fast.save_pretrained(directory)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16, pad_token_id=0, bos_token_id=2, eos_token_id=[1, 5])
    torch.manual_seed(0)
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(directory)


def _run_documented_tokenizer_fix(monkeypatch) -> None:
    """Run the command experiments/gemma_sentiment.md tells users to run after downloading
    (``.venv/bin/python -c CODE ARGS...``), in this process: ``CODE`` with ``sys.argv[1:] =
    ARGS``, in the current directory."""
    text = (EXPERIMENTS / "gemma_sentiment.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(".venv/bin/python -c ")]
    assert len(lines) == 1, lines
    _, flag, code, *args = shlex.split(lines[0])
    assert flag == "-c"
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", ["-c", *args])
        exec(compile(code, "gemma_sentiment.md", "exec"), {"__name__": "__main__"})


def test_gemma3_sentiment_with_a_tiny_gemma3_renders_chat_records(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from rlhf_jax.data.records import SourceError
    from rlhf_jax.pipeline.run import Run
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / gemma3_sentiment().policy.path  # the preset's default path
    ckpt.mkdir(parents=True)
    _save_gemma3_like(ckpt)
    # a tiny BPE needs longer buckets than Gemma's real tokenizer; shorter snippets (fewer
    # records) keep the test fast; nothing else changes
    args = ["--preset", "gemma3-sentiment", "--no-tensorboard", "--data.buckets", "256",
            "--data.prompt-buckets", "128", "--data.max-words", "8", *_cache_args()]

    # As downloaded: EOS is <eos>, which no Gemma chat turn contains -> stopped at start-up.
    with pytest.raises(SourceError, match="no end-of-turn token '<eos>'"):
        Run.create(parse_pipeline_args("pipeline", args + ["--out-dir", "runs/before"]))

    # The documented fix, run as written (in the directory the docs' paths are relative to).
    _run_documented_tokenizer_fix(monkeypatch)
    cfg = parse_pipeline_args("pipeline", args + ["--out-dir", "runs/after"])
    run = Run.create(cfg)
    try:
        tok = run.tokenizer
        eot = tok.convert_tokens_to_ids("<end_of_turn>")
        assert tok.eos_token == "<end_of_turn>" and tok.eos_token_id == eot
        assert tok.pad_token_id == tok.convert_tokens_to_ids("<pad>")
        system = cfg.data.system_prompt
        head = "<start_of_turn>model\n"

        sft = run.sft_dataset()
        assert run.data_stats["sft"].skipped.get("template", 0) == 0
        ex = sft.examples[0]
        text = tok.decode(ex.tokens)
        assert text.startswith(f"<bos><start_of_turn>user\n{system}\n\n")  # system folded in
        assert "<start_of_turn>system" not in text and text.endswith("<end_of_turn>\n")
        last = max(i for i, m in enumerate(ex.loss_mask) if m)
        assert ex.tokens[last] == eot and not ex.loss_mask[last + 1:].any()  # not the "\n"
        first = min(i for i, m in enumerate(ex.loss_mask) if m)
        assert tok.decode(ex.tokens[:first]).endswith(head)  # the header is not a target

        pair = run.preference_dataset("preferences", 2).examples[0]
        assert tok.decode(pair.prompt).endswith(head)
        assert all(int(r[-1]) == eot for r in pair.responses)

        prompt = tok.decode(run.prompt_dataset("prompts").examples[0])
        opening = prompt.split(head, 1)[1]  # pre-filled first words of a held-out snippet
        assert prompt.startswith("<bos><start_of_turn>user\n") and len(opening.split()) == 3

        sampling = run.sampling(cfg.ppo.ppo.sampling)
        assert sampling.eos_token_id == eot  # PPO and the evaluation stop at <end_of_turn>
        model, _ = run.initial_policy()
        assert model.cfg.arch == "gemma3" and model.cfg.frozen_layers == 0
        assert model.cfg.dtype == "bfloat16" and model.cfg.param_dtype == "float32"
    finally:
        run.close()
