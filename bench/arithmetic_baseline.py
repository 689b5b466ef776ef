"""Baseline accuracy of SmolLM2-135M-Instruct on the arithmetic task, and sampling cost.

For each difficulty level: the first ``--num`` held-out problems of the task (the same ones
the pipeline evaluates on; ``ArithmeticConfig`` defaults otherwise), rendered through the chat
template by the data layer (``load_prompts``), with the task's response prefix, decoded
greedily with the library's sampler; accuracy by the task's checker (the last standalone
number equals the answer) and by a strict rule (prefix plus completion is exactly
``"37 + 48 = 85"``). For ``--sample-levels``, ``--samples`` samples per problem at each of
``--temperatures`` (the GRPO setting): mean accuracy (mean@k) and the share of problems whose
k samples get mixed rewards (some right, some wrong: the groups that carry a GRPO signal).

One JSON line per (level, decoding): accuracy, response lengths in tokens (EOS included), the
tokens of the ideal completion (``" 85"`` + EOS), and the wall time of every sampling call
(``B`` rows, ``P`` prompt tokens, ``R`` new-token slots, ``steps`` filled; the first call of a
shape includes the compile).

Run (about 6 minutes on 2 idle CPU cores; downloads and converts SmolLM2 into the cache on
first use)::

    .venv/bin/python -m bench.arithmetic_baseline \
        --levels add-small,add-2digit,addsub-small,mixed-small --sample-levels add-2digit
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from bench.common import emit
from rlhf_jax.data.config import BatchConfig
from rlhf_jax.data.datasets import load_prompts
from rlhf_jax.models.convert.hf import load_hf_checkpoint
from rlhf_jax.models.convert.smollm2 import fetch_smollm2
from rlhf_jax.models.tokenizer import load_tokenizer
from rlhf_jax.rollout.postprocess import decode
from rlhf_jax.rollout.sampler import SamplingConfig, make_sampler
from rlhf_jax.tasks.arithmetic.config import (
    DEFAULT_RESPONSE_PREFIX,
    DEFAULT_SYSTEM_PROMPT,
    ArithmeticConfig,
)
from rlhf_jax.tasks.arithmetic.problems import DEFAULT_TEMPLATE, LEVELS, is_correct
from rlhf_jax.tasks.arithmetic.task import arithmetic_records

PROMPT_BUCKETS = (32, 48, 64, 96)


def prompt_batches(records, tokenizer, batch_size: int, repeat: int = 1):
    """Left-padded ``PromptBatch`` es of the records (each repeated ``repeat`` times, copies
    adjacent), ``batch_size`` rows each; the last batch is filled with copies of its first
    row (dropped from the results)."""
    ds = load_prompts(records, tokenizer, BatchConfig(batch_size=batch_size,
                                                      prompt_buckets=PROMPT_BUCKETS))
    order = np.repeat(np.arange(len(ds)), repeat)
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        n = len(idx)
        idx = np.concatenate([idx, np.full(batch_size - n, idx[0])])
        longest = int(ds.lengths[idx].max())
        length = next(b for b in PROMPT_BUCKETS if b >= longest)
        out.append((ds.collate(idx, np.ones(batch_size, bool), length), n))
    return out, ds


def run_sampling(sampler, params, batches, tokenizer, seed: int):
    """Decoded completions, their token lengths, and per-call timings."""
    texts, lengths, ended, calls = [], [], [], []
    for i, (batch, n) in enumerate(batches):
        t0 = time.perf_counter()
        out = sampler(params, batch.tokens, batch.attn_mask, jax.random.key(seed + i))
        jax.block_until_ready(out.response)
        dt = time.perf_counter() - t0
        b, p = batch.tokens.shape
        calls.append({"B": b, "P": p, "R": out.response.shape[1], "steps": int(out.num_steps),
                      "seconds": round(dt, 3)})
        texts += decode(tokenizer, out.response, out.response_mask)[:n]
        lengths += np.asarray(out.lengths).tolist()[:n]
        ended += np.asarray(out.ended).tolist()[:n]
    return texts, np.asarray(lengths), np.asarray(ended), calls


def summarize(records, texts, lengths, ended, tokenizer, repeat: int) -> dict:
    """Accuracy (the task's checker) and strict accuracy (the response is exactly the ideal
    ``prefix + " " + answer``, or the bare answer without a prefix), response lengths in
    tokens (EOS included), and the tokens of the ideal completion (EOS included)."""
    rows = np.repeat(records, repeat)
    answers = [r["answer"] for r in rows]
    ideal = [f" {r['answer']}" if r.get("response_prefix") else str(r["answer"]) for r in rows]
    correct = np.asarray([is_correct(t, a) for t, a in zip(texts, answers)])
    strict = np.asarray([t.strip() == (r.get("response_prefix", "") + c).strip()
                         for t, r, c in zip(texts, rows, ideal)])
    ideal_tokens = [len(tokenizer.encode(c, add_special_tokens=False)) + 1 for c in ideal]
    out = {
        "accuracy": round(float(correct.mean()), 4),
        "strict_accuracy": round(float(strict.mean()), 4),
        "ended_fraction": round(float(ended.mean()), 4),
        "mean_length": round(float(lengths.mean()), 2),
        "max_length": int(lengths.max()),
        "mean_length_correct": round(float(lengths[correct].mean()), 2) if correct.any() else None,
        "max_length_correct": int(lengths[correct].max()) if correct.any() else None,
        "ideal_completion_tokens_max": int(max(ideal_tokens)),
    }
    if repeat > 1:
        k = correct.reshape(-1, repeat).sum(-1)
        out["groups_mixed_fraction"] = round(float(((k > 0) & (k < repeat)).mean()), 4)
        out["groups_correct_counts"] = np.bincount(k, minlength=repeat + 1).tolist()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="add-small,add-2digit",
                    help=f"comma-separated names of LEVELS ({', '.join(LEVELS)})")
    ap.add_argument("--sample-levels", default="",
                    help="levels also measured with --samples samples per problem")
    ap.add_argument("--num", type=int, default=128, help="held-out problems per level")
    ap.add_argument("--batch", type=int, default=64, help="rows per sampling call")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperatures", default="1.0",
                    help="comma-separated sampling temperatures of the --sample-levels runs")
    ap.add_argument("--no-greedy", action="store_true", help="skip the greedy runs")
    ap.add_argument("--template", default=DEFAULT_TEMPLATE)
    ap.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT or "none",
                    help="system message; 'none' for none (the chat template's default)")
    ap.add_argument("--prefix", default=DEFAULT_RESPONSE_PREFIX,
                    help="response prefix ({expression} = the problem); '' for none")
    ap.add_argument("--show", type=int, default=4, help="example responses per line")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    path = fetch_smollm2()
    tokenizer = load_tokenizer(path)
    t0 = time.perf_counter()
    model, params = load_hf_checkpoint(path)
    load_s = time.perf_counter() - t0
    system = None if args.system.lower() == "none" else args.system
    base = SamplingConfig(max_new_tokens=args.max_new_tokens).with_token_ids(
        tokenizer.eos_token_id, tokenizer.pad_token_id)
    temperatures = [float(t) for t in args.temperatures.split(",") if t]
    samplers = {("greedy", None): make_sampler(model, dataclasses.replace(base, greedy=True))}
    for t in temperatures:
        samplers[("sample", t)] = make_sampler(model, dataclasses.replace(base, temperature=t))
    sample_levels = [s for s in args.sample_levels.split(",") if s]
    for level in [s for s in args.levels.split(",") if s]:
        cfg = ArithmeticConfig.level(level, template=args.template, system_prompt=system,
                                     response_prefix=args.prefix, eval_size=max(args.num, 1),
                                     train_size=1, sft_size=0)
        records = arithmetic_records(cfg)["eval_prompts"][: args.num]
        runs = [] if args.no_greedy else [("greedy", None, 1)]
        if level in sample_levels:
            runs += [("sample", t, args.samples) for t in temperatures]
        for mode, temperature, repeat in runs:
            batches, ds = prompt_batches(records, tokenizer, args.batch, repeat)
            texts, lengths, ended, calls = run_sampling(samplers[(mode, temperature)], params,
                                                        batches, tokenizer, args.seed)
            # what the judge sees: the pre-filled prefix and the completion
            texts = [ds.prefixes[i] + t for i, t in zip(np.repeat(np.arange(len(ds)), repeat),
                                                         texts)]
            emit(bench="arithmetic_baseline", level=level, difficulty=dataclasses.asdict(
                     cfg.difficulty), decoding=mode,
                 temperature=temperature, samples=repeat,
                 problems=len(records), template=args.template, system_prompt=system,
                 response_prefix=args.prefix,
                 prompt_tokens_max=int(ds.lengths.max()), max_new_tokens=args.max_new_tokens,
                 **summarize(records, texts, lengths, ended, tokenizer, repeat),
                 calls=calls, sampling_seconds=round(sum(c["seconds"] for c in calls), 2),
                 model_load_seconds=round(load_s, 2),
                 examples=[[r["expression"], t] for r, t in
                           zip(np.repeat(records, repeat), texts)][: args.show * repeat])


if __name__ == "__main__":
    main()
