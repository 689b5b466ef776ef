"""The judged evaluation: every trained policy samples the same held-out prompts with the same
key; the task's judge scores the decoded responses, the reward model scores them, and the
KL to the baseline (the SFT policy, or the initial policy in a run without SFT) is measured;
then the report. With ``eval.num_samples = k > 1`` every policy also samples ``k`` responses
per prompt at ``eval.sample_temperature`` and the judge's mean over them (mean@k) is
reported per prompt, paired against the baseline like the first sample.

Prompts are split across processes: each process feeds its rows of every global batch,
decodes and judges only those rows, and the per-row results are all-gathered (in global row
order) before the summary. Sampling itself is one global computation on the mesh.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.losses.kl import sequence_kl
from rlhf_jax.metrics import progress, read_jsonl
from rlhf_jax.pipeline.artifacts import write_json_atomic
from rlhf_jax.pipeline.registry import register_stage
from rlhf_jax.pipeline.run import Run, gather_rows, local_rows
from rlhf_jax.pipeline.stages import prompt_batches, reward_model_scorer
from rlhf_jax.rollout.postprocess import decode
from rlhf_jax.rollout.sampler import SamplingConfig, make_sampler
from rlhf_jax.train.ppo import policy_forward

log = logging.getLogger(__name__)

#: The policy every other is compared with: SFT, or the initial policy when there is no SFT.
BASELINES = ("sft", "initial")


def mean_se(x) -> tuple[float, float]:
    """Mean and standard error of the mean (``ddof=1``; 0 for a single value)."""
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def model_label(run: Run, name: str) -> str:
    """The report's name of a policy: the stage in capitals, the RL stage by its estimator
    (``PPO`` with GAE, ``GRPO``, ``RLOO``, ...)."""
    advantage = run.cfg.ppo.ppo.advantage
    if name == "ppo" and advantage != "gae":
        return advantage.upper().replace("_PP", "++").replace("_", ". ")
    return name.upper()


def _local_row_indices(mesh, batch_size: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold, ascending (the order of
    ``run.local_rows``)."""
    index_map = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,))
    rows = set()
    for idx in index_map.values():
        rows.update(range(*idx[0].indices(batch_size)))
    return np.asarray(sorted(rows))


def _sample_policy(run: Run, model, params, ref, rm, batches, prefixes, columns, sampling,
                   sampler, logp_fn, key_offset: int = 1000, num_samples: int = 1,
                   judge_only: bool = False, gold: bool = False):
    """Per-row results of one policy on this process's rows, gathered across processes; with
    a ``sampler`` of ``num_samples = k`` responses per prompt, ``k`` consecutive rows per
    prompt. ``rm``: a ``RewardModelScorer`` (``stages.reward_model_scorer``: the normalised,
    for an ensemble aggregated, reward-model score fills the ``"rm"`` column) or ``None``.
    ``judge_only``: no KL and reward-model forwards (the mean@k samples); ``gold``: the
    ``"judge"`` column holds the task's gold reward (``Task.gold_score``). ``ref = (model,
    None)``: the KL reference is ``params`` with the LoRA adapters off (the policy's base)."""
    ref_model, ref_params = ref
    e = run.cfg.eval
    rows = _local_row_indices(run.mesh, e.batch_size)
    cols: dict[str, list] = {"index": [], "kl": [], "rm": [], "length": [], "ended": []}
    texts, prompts = [], []
    with jax.set_mesh(run.mesh):
        for i, host_batch in enumerate(batches):
            b = run.place(host_batch)
            s = sampler(params, b.tokens, b.attn_mask,
                        jax.random.key(run.cfg.seed + key_offset + i))
            p_len = b.tokens.shape[1]
            mask = local_rows(s.response_mask)
            texts += decode(run.tokenizer, local_rows(s.response), mask)
            prompts += [p for p in decode(run.tokenizer, np.asarray(host_batch.tokens),
                                          np.asarray(host_batch.attn_mask, bool))
                        for _ in range(num_samples)]
            cols["index"].append(np.repeat(rows + i * e.batch_size, num_samples))
            cols["length"].append(local_rows(s.lengths))
            cols["ended"].append(local_rows(s.ended))
            if judge_only:
                continue
            lp = logp_fn(model, params, s.tokens, s.positions, s.attn_mask, prompt_len=p_len,
                         sampling=sampling)[0]
            if ref_params is None:  # a LoRA policy's frozen base: the adapters switched off
                lr = logp_fn(model, params, s.tokens, s.positions, s.attn_mask,
                             prompt_len=p_len, sampling=sampling, adapters=False)[0]
            else:
                lr = logp_fn(ref_model, ref_params, s.tokens, s.positions, s.attn_mask,
                             prompt_len=p_len, sampling=sampling)[0]
            cols["kl"].append(local_rows(sequence_kl(lp, lr, s.response_mask)))
            if rm is not None:
                cols["rm"].append(local_rows(rm(s.tokens, s.positions, s.attn_mask)["score"]))
    index = np.concatenate(cols["index"])
    full = [prefixes[j] + t for j, t in zip(index, texts)]
    local = {k: np.concatenate(v).astype(np.float64) for k, v in cols.items()
             if v and k != "index"}
    if (run.task.gold_judge if gold else run.task.judge) is not None:
        judge = run.task.gold_score if gold else run.task.score
        local["judge"] = judge(prompts, full, {
            name: [col[j % len(col)] for j in index] for name, col in columns.items()})
    order = np.argsort(gather_rows(index), kind="stable")
    result = {k: gather_rows(v)[order][: e.num_prompts * num_samples] for k, v in local.items()}
    # Report samples: keyed by the pre-filled prefix (or the prompt text when there is none).
    return result, [(prefixes[j] or p, f) for j, p, f in zip(index, prompts, full)]


@register_stage("eval", sections=("seed", "task", "data", "eval"), writes_final=False,
                optional_inputs=("sft", "rm", "ppo", "dpo"),
                description="judged evaluation of every trained policy, and the report")
def run_eval(run: Run) -> dict:
    """Sample every finished policy on the same held-out prompts with the same key; judge
    (the task's judge), score (the reward model, normalised; an ensemble aggregated with
    ``ppo.reward_aggregation`` as RL used it, ``stages.reward_model_scorer``), measure KL to
    the SFT reference under the sampled (tempered) distribution; write ``summary.json`` and
    the report."""
    e = run.cfg.eval
    names = [n for n in ("sft", "ppo", "dpo") if run.files(n).complete]
    policies = {n: run.load_final(n) for n in names}
    if "sft" not in policies:  # e.g. RL straight from an instruct model (ppo.init = "initial")
        model, params = run.initial_policy()
        policies = {"initial": (model, params, {}), **policies}
    baseline = next(iter(policies))
    rm = reward_model_scorer(run, *run.load_final("rm")) if run.files("rm").complete else None
    batches, prefixes = prompt_batches(run, "eval_prompts", e.num_prompts, e.batch_size)
    columns = run.prompt_dataset("eval_prompts").columns
    ref_model, ref_params, _ = policies[baseline]
    sampling = run.sampling(SamplingConfig(
        max_new_tokens=e.max_new_tokens, min_new_tokens=e.min_new_tokens,
        greedy=e.temperature == 0, temperature=e.temperature or 1.0))
    # Response log-probs under the distribution sampled from (temperature, EOS constraint), so
    # the mean of log pi - log ref over samples estimates KL(pi_tau || ref_tau).
    logp_fn = jax.jit(policy_forward,
                      static_argnames=("model", "prompt_len", "sampling", "adapters"))
    sampling_k = run.sampling(SamplingConfig(
        max_new_tokens=e.max_new_tokens, min_new_tokens=e.min_new_tokens,
        temperature=e.sample_temperature))
    results, samples, samplers = {}, {}, {}
    for name, (model, params, _) in progress(list(policies.items()), desc="eval", unit="model"):
        arch = (model.cfg, model.kind)  # one jitted sampler (one compile) per architecture
        sampler = samplers.get(arch) or samplers.setdefault(arch, make_sampler(model, sampling))
        args = (run, model, params, (ref_model, ref_params), rm, batches, prefixes, columns)
        results[name], texts = _sample_policy(*args, sampling, sampler, logp_fn)
        samples[name] = texts
        if e.num_samples > 1 and run.task.judge is not None:  # one prefill per prompt
            sampler_k = samplers.get((*arch, "k")) or samplers.setdefault(
                (*arch, "k"), make_sampler(model, sampling_k, num_samples=e.num_samples))
            draws = _sample_policy(*args, sampling_k, sampler_k, logp_fn,
                                   key_offset=5000, num_samples=e.num_samples,
                                   judge_only=True)[0]["judge"]
            results[name]["judge_mean_at_k"] = draws.reshape(-1, e.num_samples).mean(axis=1)
    return _summarise(run, results, samples, rm, baseline)


def _summarise(run: Run, results: dict, samples: dict, rm, baseline: str) -> dict:
    task = run.task
    has_judge = task.judge is not None
    base = results[baseline]
    base_label = baseline.upper()
    k = run.cfg.eval.num_samples
    rows, judged, summary = [], {}, {}
    for name, r in results.items():
        kl, kl_se = mean_se(r["kl"])
        entry = {"kl": kl, "kl_se": kl_se, "length": float(np.mean(r["length"])),
                 "no_eos_share": float(1 - np.mean(r["ended"]))}
        row = {"model": model_label(run, name)}
        if has_judge:
            m, se = mean_se(r["judge"])
            d, dse = mean_se(r["judge"] - base["judge"])
            entry.update(judge_mean=m, judge_se=se, judge_delta=d, judge_delta_se=dse)
            row[f"{task.judge_name} (mean ± s.e.)"] = f"{m:+.3f} ± {se:.3f}"
            row[f"Δ vs {base_label} (paired)"] = (
                "-" if name == baseline else f"{d:+.3f} ± {dse:.3f} (t={d / max(dse, 1e-12):.1f})")
            if "judge_mean_at_k" in r:
                mk, sek = mean_se(r["judge_mean_at_k"])
                dk, dsek = mean_se(r["judge_mean_at_k"] - base["judge_mean_at_k"])
                entry.update(judge_mean_at_k=mk, judge_mean_at_k_se=sek, judge_mean_at_k_delta=dk,
                             judge_mean_at_k_delta_se=dsek)
                row[f"mean@{k} (T={run.cfg.eval.sample_temperature})"] = (
                    f"{mk:.3f} ± {sek:.3f}" if name == baseline else
                    f"{mk:.3f} ± {sek:.3f}; Δ {dk:+.3f} ± {dsek:.3f} (t={dk / max(dsek, 1e-12):.1f})")
            judged[model_label(run, name)] = {"judge_mean": m, "judge_se": se, "kl_mean": kl, "kl_se": kl_se,
                                    **({} if name == baseline else
                                       {"delta_mean": d, "delta_se": dse})}
        if "rm" in r:
            entry["rm_score"] = float(np.mean(r["rm"]))
        row.update({f"KL to {base_label} (nats/seq)": f"{kl:.2f}",
                    "RM score": f"{entry['rm_score']:+.2f}" if "rm_score" in entry else "-",
                    "length (tokens)": f"{entry['length']:.1f}",
                    "no-EOS share": f"{entry['no_eos_share']:.2f}"})
        rows.append(row)
        summary[name] = entry
        run.logger.log(0, {f"eval/{k}": v for k, v in entry.items()}, stage=f"eval_{name}")
    rm_acc = rm.meta.get("heldout_accuracy") if rm is not None else None
    summary["rm_heldout_accuracy"] = rm_acc
    summary["baseline"] = baseline
    summary["data"] = run.data_metrics()
    run.logger.log(0, summary["data"], stage="data")  # kept / skipped records per source
    write_json_atomic(run.out / "summary.json", summary)
    if jax.process_index() == 0:
        _write_report(run, rows, judged, samples, rm_acc, base_label)
    return summary


def _write_report(run: Run, rows, judged, samples, rm_acc, base_label: str) -> None:
    from rlhf_jax.report import markdown_table, write_report
    e, task = run.cfg.eval, run.task
    n = len(next(iter(samples.values())))
    notes = (f"Task: {task.name}. {task.description} Held-out prompts: {e.num_prompts} (same prompts "
             f"and sampling key for every model, temperature {e.temperature}). Δ is the paired "
             f"difference to {base_label} over prompts with its standard error. KL to "
             f"{base_label} is measured under the sampled (tempered) distributions. "
             + (f"mean@{e.num_samples}: the judge's mean over {e.num_samples} samples per prompt "
                f"at temperature {e.sample_temperature}. " if e.num_samples > 1 else "")
             + f"Reward-model accuracy on held-out comparisons: "
             f"{'-' if rm_acc is None else f'{rm_acc:.3f}'}. ({n} samples judged on process 0.)")
    records: dict[str, list[dict]] = {}
    path = run.out / "metrics.jsonl"
    if path.exists():
        for r in read_jsonl(path):
            records.setdefault(str(r.get("stage", "")).replace("_eval", ""), []).append(r)
    data_rows = [{"source": name, "kept": s.kept, "skipped": s.num_skipped,
                  **{f"skipped: {k}": v for k, v in s.skipped.items() if v}}
                 for name, s in run.data_stats.items()]
    shown = {model_label(run, name): pairs[: e.samples_in_report]
             for name, pairs in samples.items()}
    report = write_report(run.out, title=f"rlhf_jax report: {run.cfg.name}", stages=records,
                          summary_rows=rows, samples=shown, notes=notes,
                          judged=judged or None, baseline=base_label if judged else None,
                          data_rows=data_rows)
    print(f"\n{markdown_table(rows)}\n\nreport: {report}")
