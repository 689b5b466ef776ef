"""The training loop (``rlhf_jax.train.loop.run_loop``) on a tiny model and the real SFT step.

* resume equivalence: a run killed after its checkpoint at step k and resumed from a *fresh*
  initial state ends with bit-identical state and logs the same metrics for steps k+1..N as
  an uninterrupted run (the data iterator's position is restored from the checkpoint);
* SIGTERM at step j: the loop saves step j, returns ``preempted=True`` and the process lives
  on; resuming continues to N and matches the uninterrupted run;
* a NaN loss at step j raises ``NonFiniteLossError`` naming step j, and the newest checkpoint
  on disk is from before j and holds finite parameters;
* a checkpoint of another model (other ``d_model``) is refused with a ``ValueError`` naming a
  leaf (or the differing fingerprint field);
* evaluation cadence, and re-running a finished loop is a no-op.

Data: a real ``BatchIterator`` (shuffled, epochs wrapping) over a small ``SFTDataset`` of
synthetic token sequences, so the iterator position round-trips through checkpoint meta.
Parameters are random NumPy values (no NNX init compile); the SFT step compiles once.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.checkpoint import Checkpointer, NonFiniteLossError, abstract_like, model_fingerprint
from rlhf_jax.config import ModelConfig
from rlhf_jax.data.pipeline import SFTDataset
from rlhf_jax.data.records import DataStats
from rlhf_jax.data.tokenize import SFTExample
from rlhf_jax.metrics import MetricsLogger, read_jsonl
from rlhf_jax.models.model import Model
from rlhf_jax.train.loop import LoopConfig, run_loop
from rlhf_jax.train.sft import make_sft_step
from rlhf_jax.train.state import OptimizerConfig, create_train_state, make_optimizer

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                   max_positions=64)
MODEL = Model(TINY)
N = 6                      # steps of a full run
BATCH = 4
NUM_EXAMPLES = 10          # not a multiple of BATCH: batches straddle epochs ("wrap")
# A decaying schedule, so a resumed optimizer with a wrong step count would show.
OPT = OptimizerConfig(lr=3e-3, warmup_steps=2, schedule="cosine", total_steps=N)


def _random_params(cfg: ModelConfig, seed: int = 0):
    model = Model(cfg)
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.05 * rs.standard_normal(s.shape), s.dtype),
                        model.abstract_params())


TX = make_optimizer(OPT, _random_params(TINY))
STEP = make_sft_step(MODEL, TX)  # jitted once for the module; wrappers below call it


def fresh_state(cfg: ModelConfig = TINY):
    """A new step-0 state (steps donate their state, so every run needs its own)."""
    params = _random_params(cfg)
    tx = TX if cfg == TINY else make_optimizer(OPT, params)
    return create_train_state(params, tx, jax.random.key(0))


def _dataset() -> SFTDataset:
    rs = np.random.RandomState(1)
    examples = []
    for _ in range(NUM_EXAMPLES):
        n = int(rs.randint(8, 17))
        tokens = rs.randint(3, TINY.vocab_size, size=n).astype(np.int32)
        loss = np.arange(n) >= n // 2
        examples.append(SFTExample(tokens=tokens, loss_mask=loss))
    return SFTDataset(examples, [f"ex[{i}]" for i in range(NUM_EXAMPLES)],
                      DataStats(source="synthetic"), buckets=(16,), pad_id=0)


DATASET = _dataset()


def batches():
    """A fresh iterator at position 0 (a restarted process builds a new one)."""
    return DATASET.batches(_batch_cfg())


def _batch_cfg():
    from rlhf_jax.data.config import DataConfig
    return DataConfig(batch_size=BATCH, buckets=(16,), seed=3, remainder="wrap")


def place(batch):
    return jax.device_put(batch, jax.devices()[0])


def loop(out_dir, *, total_steps=N, checkpoint_every=2, step_fn=STEP, state=None,
         resume=True, loss_key="sft/loss", fingerprint=None, eval_fn=None, eval_every=0):
    logger = MetricsLogger(out_dir, tensorboard=False)
    try:
        state = fresh_state() if state is None else state
        return run_loop(stage="sft", step_fn=step_fn, state=state, batches=batches(), place=place,
                        out_dir=out_dir,
                        cfg=LoopConfig(total_steps=total_steps, checkpoint_every=checkpoint_every,
                                       resume=resume, eval_every=eval_every),
                        logger=logger, loss_key=loss_key, fingerprint=fingerprint,
                        eval_fn=eval_fn, meta={"note": "test"})
    finally:
        logger.close()


def host(state):
    """Host copy of a whole state (typed keys as key data)."""
    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    return jax.tree.map(leaf, state)


def assert_bit_identical(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for (path, x), y in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted N-step run: (host state, records, out_dir)."""
    out = tmp_path_factory.mktemp("loop_ref")
    result = loop(out)
    assert result.step == N and not result.preempted
    return host(result.state), result.records, out


def test_uninterrupted_run_logs_every_step_and_learns(reference):
    state, records, out = reference
    assert [r["step"] for r in records] == list(range(1, N + 1))
    assert all(r["stage"] == "sft" for r in records)
    losses = [r["sft/loss"] for r in records]
    assert all(np.isfinite(losses)) and all(0 < x < 10 for x in losses)
    assert "train/grad_norm" in records[0] and records[0]["train/grad_norm"] > 0
    assert int(state.step) == N
    # the JSONL file holds exactly what the loop returned
    assert without_time(read_jsonl(out / "metrics.jsonl")) == without_time(records)
    ckpt = Checkpointer(out / "checkpoints", max_to_keep=2)
    assert ckpt.all_steps() == [N - 2, N]  # every 2 steps, 2 kept
    meta = ckpt.restore_meta()
    assert meta["step"] == N and meta["stage"] == "sft" and meta["note"] == "test"
    # the data position went N * BATCH examples into the wrapped epochs
    assert (meta["data"]["epoch"], meta["data"]["index"]) == divmod(N * BATCH, NUM_EXAMPLES)
    ckpt.close()


def test_resume_after_kill_is_bit_identical(tmp_path, reference):
    ref_state, ref_records, _ = reference
    k = 2
    calls = {"n": 0}

    def dies_during_step_k_plus_2(state, batch):
        calls["n"] += 1
        if calls["n"] == k + 2:  # step k+1 ran but was never checkpointed: it is redone
            raise RuntimeError("killed")
        return STEP(state, batch)

    with pytest.raises(RuntimeError, match="killed"):
        loop(tmp_path, checkpoint_every=k, step_fn=dies_during_step_k_plus_2)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.latest_step() == k
    ckpt.close()

    resumed = loop(tmp_path, checkpoint_every=k)  # fresh state, fresh iterator
    assert resumed.step == N and not resumed.preempted
    assert_bit_identical(host(resumed.state), ref_state)
    assert [r["step"] for r in resumed.records] == list(range(k + 1, N + 1))
    assert without_time(resumed.records) == without_time(ref_records[k:])
    # the metrics file of the killed + resumed run equals the uninterrupted one: steps 1..k
    # from the first process (k+1 was computed but never logged), k+1..N from the second
    assert without_time(read_jsonl(tmp_path / "metrics.jsonl")) == without_time(ref_records)


def test_rerunning_a_finished_loop_is_a_no_op(tmp_path):
    first = loop(tmp_path, total_steps=2)
    calls = []
    again = loop(tmp_path, total_steps=2, step_fn=lambda s, b: calls.append(1) or STEP(s, b))
    assert calls == [] and again.step == 2 and again.records == []
    assert_bit_identical(host(again.state), host(first.state))


def test_sigterm_saves_returns_and_resumes(tmp_path, reference):
    ref_state, ref_records, _ = reference
    j = 3  # not a checkpoint step (checkpoint_every=4)
    previous_handler = signal.getsignal(signal.SIGTERM)
    calls = {"n": 0}

    def preempted_at_j(state, batch):
        out = STEP(state, batch)
        calls["n"] += 1
        if calls["n"] == j:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    result = loop(tmp_path, checkpoint_every=4, step_fn=preempted_at_j)
    # still alive, the loop returned after saving step j; our handler is back in place
    assert result.preempted and result.step == j and calls["n"] == j
    assert int(result.state.step) == j
    assert signal.getsignal(signal.SIGTERM) == previous_handler
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [j]
    assert ckpt.restore_meta()["step"] == j
    ckpt.close()
    assert [r["step"] for r in result.records] == list(range(1, j + 1))
    assert without_time(result.records) == without_time(ref_records[:j])

    resumed = loop(tmp_path, checkpoint_every=4)
    assert not resumed.preempted and resumed.step == N
    assert_bit_identical(host(resumed.state), ref_state)
    assert without_time(resumed.records) == without_time(ref_records[j:])


def _nan_at(j):
    calls = {"n": 0}

    def step(state, batch):
        state, metrics = STEP(state, batch)
        calls["n"] += 1
        if calls["n"] == j:  # the update blew up: NaN parameters and loss
            state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
            metrics = {**metrics, "sft/loss": (jnp.asarray(jnp.nan), jnp.asarray(1.0))}
        return state, metrics
    return step


@pytest.mark.parametrize("j,loss_key", [(3, "sft/loss"), (4, None)])
def test_nan_loss_stops_before_any_bad_checkpoint(tmp_path, j, loss_key):
    # j=3: found when step 4 is dispatched (deferred read); j=4: found by the check that
    # precedes the step-4 save. Either way step j never reaches the disk.
    with pytest.raises(NonFiniteLossError, match=rf"at step {j}\b") as info:
        loop(tmp_path, checkpoint_every=2, step_fn=_nan_at(j), loss_key=loss_key)
    assert info.value.step == j and info.value.name == "sft/loss"
    ckpt = Checkpointer(tmp_path / "checkpoints")
    latest = ckpt.latest_step()
    assert latest is not None and latest < j and ckpt.all_steps() == [2]
    state, meta = ckpt.restore(abstract_like(fresh_state()))
    ckpt.close()
    assert meta["step"] == latest == int(state.step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, j))  # the NaN record is not logged


def test_checkpoint_of_another_model_is_refused(tmp_path):
    loop(tmp_path, total_steps=1, checkpoint_every=1)
    other_cfg = dataclasses.replace(TINY, d_model=48)
    never = lambda s, b: pytest.fail("no step may run on a mismatched restore")  # noqa: E731
    # structural check: the first mismatching leaf is named, with both shapes
    with pytest.raises(ValueError, match=r"leaf \S+: expected shape \([^)]*48[^)]*\), found "
                                         r"\([^)]*32[^)]*\)") as info:
        loop(tmp_path, step_fn=never, state=fresh_state(other_cfg))
    assert str(tmp_path / "checkpoints") in str(info.value)
    # with a fingerprint: the differing config field is named before any array is read
    fp_dir = tmp_path / "fp"
    loop(fp_dir, total_steps=1, fingerprint=model_fingerprint(MODEL))
    with pytest.raises(ValueError, match="d_model: expected 48, found 32"):
        loop(fp_dir, step_fn=never, state=fresh_state(other_cfg),
             fingerprint=model_fingerprint(Model(other_cfg)))


def test_eval_hook_cadence(tmp_path):
    seen = []

    def eval_fn(state, step):
        seen.append((step, int(state.step)))
        return {"eval/steps_seen": float(state.step)}

    result = loop(tmp_path, total_steps=5, checkpoint_every=0, eval_fn=eval_fn, eval_every=2)
    assert seen == [(2, 2), (4, 4), (5, 5)]  # every 2 steps and once at the end
    evals = [r for r in result.records if r["stage"] == "sft_eval"]
    assert [(r["step"], r["eval/steps_seen"]) for r in evals] == [(2, 2.0), (4, 4.0), (5, 5.0)]
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [5]  # checkpoint_every=0: only at the end
    ckpt.close()


def test_loop_config_validation():
    with pytest.raises(ValueError, match="total_steps"):
        LoopConfig(total_steps=-1)
    with pytest.raises(ValueError, match="max_to_keep"):
        LoopConfig(total_steps=1, max_to_keep=0)
    cfg = LoopConfig(total_steps=3)
    assert (cfg.checkpoint_every, cfg.max_to_keep, cfg.eval_every, cfg.resume) == (0, 2, 0, True)
