"""Forward+backward+AdamW step time of the fixed GPT-2 workloads (``workload.json``).

For each selected variant (``small``, ``medium``): a GPT-2-architecture LM from
``rlhf_jax.config.gpt2_config`` with random init (the workload's seed), a batch of
``batch_size x (prompt_len + response_len)`` random tokens, and one jitted step

    loss, grads = value_and_grad(mean token cross-entropy over all T-1 next-token targets)
    params, opt_state = adamw(workload["optimizer"]) update          (state donated)

timed as the median over ``timed_steps`` after ``warmup_steps``. Achieved GFLOP/s counts
``ModelConfig.flops_per_token(T) x 3`` (forward + backward ~ 2x forward; Kaplan et al. 2020)
``x B x T`` per step and is printed next to the machine's fp32 matmul GFLOP/s (``bench.common``).
A forward-only line (the loss, no gradient) is emitted too, as a diagnostic.

Run: ``.venv/bin/python -m bench.model_step --workload all`` (see ``bench/README.md``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.common import add_workload_args, emit, load_workload, make_matmul, matmul_gflops, timeit_interleaved
from rlhf_jax.config import ModelConfig, gpt2_config
from rlhf_jax.models.model import Model


def model_config(variant: dict, dtype: str, *, param_dtype: str | None = None,
                 **overrides) -> ModelConfig:
    """The ``ModelConfig`` of a workload variant (raises on a non-zero dropout: the model has
    none). The variant's ``model`` dict is one of:

    * GPT-2 hyper-parameters (``n_layer``, ``n_embd``, ``n_head``, ``n_positions``,
      ``vocab_size``): ``rlhf_jax.config.gpt2_config`` (the ``workload.json`` variants);
    * ``{"architecture": NAME, ...}``: a named shape of
      ``rlhf_jax.models.architectures.ARCHITECTURES`` (e.g. ``"llama3.2-1b"``), the other keys
      ``ModelConfig`` fields set on top (``resolve_architecture``);
    * ``{"arch": FAMILY, ...}``: ``ModelConfig`` fields as they are (e.g. a Llama's
      ``d_model``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ``mlp_dim``, ``vocab_size``).

    Args:
      dtype: the compute dtype (``ModelConfig.dtype``).
      param_dtype: the storage dtype of the parameters; ``None``: ``dtype`` (the float32
        workloads store and compute in float32).
      overrides: other ``ModelConfig`` fields (``scan_unroll``, ``remat``).
    """
    m = dict(variant["model"])
    dropout = m.pop("dropout", 0.0)
    if dropout:
        raise ValueError(f"workload dropout={dropout}: rlhf_jax models have no dropout")
    pdt = dtype if param_dtype is None else param_dtype
    if "architecture" in m:
        from rlhf_jax.models.architectures import resolve_architecture
        name = m.pop("architecture")
        return resolve_architecture(name, **{**m, **overrides}, dtype=dtype, param_dtype=pdt)
    if "arch" in m:
        return ModelConfig(**{**m, **overrides}, dtype=dtype, param_dtype=pdt)
    return gpt2_config(**m, dtype=dtype, param_dtype=pdt, **overrides)


def make_optimizer(opt: dict) -> optax.GradientTransformation:
    """``optax.adamw`` from the workload's ``optimizer`` section."""
    if opt.get("name", "adamw") != "adamw":
        raise ValueError(f"optimizer {opt['name']!r} not supported (adamw only)")
    b1, b2 = opt["betas"]
    return optax.adamw(opt["lr"], b1=b1, b2=b2, eps=opt["eps"], weight_decay=opt["weight_decay"])


def token_xent(model: Model, params, tokens_BxT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats/token) over all ``B x (T-1)`` targets."""
    b, t = tokens_BxT.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.ones((b, t), bool)
    logits_BxTxV = model.apply(params, tokens_BxT, positions, mask).logits
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV[:, :-1], tokens_BxT[:, 1:]))


def bench_variant(name: str, variant: dict, workload: dict, matmul: tuple, *,
                  forward_only: bool = True, **overrides) -> list[dict]:
    """Emit the forward-only (optional) and the train-step lines of one workload variant.

    ``matmul``: ``(fn, flops)`` from ``bench.common.make_matmul``, timed interleaved with the
    step so the ratio ``frac_of_peak`` compares numbers taken under the same machine load.
    """
    cfg = model_config(variant, workload.get("dtype", "float32"), **overrides)
    model = Model(cfg)
    b, t = variant["batch_size"], variant["prompt_len"] + variant["response_len"]
    warmup, iters = variant["warmup_steps"], variant["timed_steps"]
    key = jax.random.key(workload["seed"])
    pkey, dkey = jax.random.split(key)
    params = jax.jit(model.init)(pkey)
    tokens = jax.random.randint(dkey, (b, t), 0, cfg.vocab_size, jnp.int32)
    tx = make_optimizer(workload["optimizer"])
    opt_state = jax.jit(tx.init)(params)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: token_xent(model, p, tokens))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    mm_fn, mm_flops = matmul
    flops_fwd = cfg.flops_per_token(t) * b * t
    common = {"workload": name, "batch": b, "seq": t, "tokens_per_step": b * t,
              "num_params": model.num_params(params), "dtype": cfg.dtype,
              "scan_unroll": cfg.scan_unroll, "remat": cfg.remat,
              "matmul_precision": jax.config.jax_default_matmul_precision}

    def measure(bench: str, fn, flops: int, compile_s: float | None = None, **extra) -> dict:
        if compile_s is None:
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            compile_s = time.perf_counter() - t0
        cpu: dict[str, list[float]] = {}
        times = timeit_interleaved({"step": fn, "matmul": mm_fn}, warmup, iters, cpu_out=cpu)
        step_cpu, mm_cpu = statistics.median(cpu["step"]), statistics.median(cpu["matmul"])
        sec = statistics.median(times["step"])
        peak = mm_flops / statistics.median(times["matmul"]) / 1e9
        gflops = flops / sec / 1e9
        return emit(bench=bench, **common, compile_s=round(compile_s, 2), step_s=sec,
                    step_s_min=min(times["step"]), iters=iters, tokens_per_s=b * t / sec,
                    gflop_per_step=flops / 1e9, gflops=gflops, matmul_peak_gflops=peak,
                    frac_of_peak=gflops / peak, gflops_best=flops / min(times["step"]) / 1e9,
                    matmul_peak_gflops_best=mm_flops / min(times["matmul"]) / 1e9,
                    best_frac_of_peak=(flops / min(times["step"]))
                    / (mm_flops / min(times["matmul"])),
                    step_cpu_s=step_cpu, matmul_cpu_s=mm_cpu,
                    cpu_frac_of_peak=(flops / step_cpu) / (mm_flops / mm_cpu),
                    **extra)

    out = []
    if forward_only:
        fwd = jax.jit(lambda p, x: token_xent(model, p, x))
        out.append(measure("model_fwd", lambda: fwd(params, tokens), flops_fwd))

    state = {"params": params, "opt": opt_state}
    del params, opt_state

    def run():
        state["params"], state["opt"], loss = step(state["params"], state["opt"], tokens)
        return loss

    t0 = time.perf_counter()
    first_loss = float(run())  # compiles
    out.append(measure("model_fwd_bwd_adamw", run, 3 * flops_fwd,
                       compile_s=time.perf_counter() - t0, first_loss=first_loss,
                       ln_vocab=float(np.log(cfg.vocab_size))))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(ap)
    ap.add_argument("--no-forward", action="store_true", help="skip the forward-only line")
    ap.add_argument("--scan-unroll", default="1",
                    help="ModelConfig.scan_unroll: an int, or 'layers' (= n_layers, no loop)")
    ap.add_argument("--remat", action="store_true", help="ModelConfig.remat=True")
    args = ap.parse_args(argv)

    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    workload, path = load_workload(args.workload_file)
    names = list(workload["variants"]) if args.workload == "all" else args.workload.split(",")
    for n in names:
        if n not in workload["variants"]:
            raise SystemExit(f"unknown workload {n!r} in {path}; have {list(workload['variants'])}")
    matmul = make_matmul(args.matmul_n)
    emit(bench="matmul", workload_file=str(path), **matmul_gflops(args.matmul_n))
    for n in names:
        variant = workload["variants"][n]
        unroll = (model_config(variant, workload.get("dtype", "float32")).n_layers
                  if args.scan_unroll == "layers" else int(args.scan_unroll))
        bench_variant(n, variant, workload, matmul, forward_only=not args.no_forward,
                      scan_unroll=unroll, remat=args.remat)


if __name__ == "__main__":
    sys.exit(main())
