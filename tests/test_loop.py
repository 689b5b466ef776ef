"""The training loop (``rlhf_jax.train.loop.run_loop``) on a tiny model and the real SFT step.

* resume equivalence: a run killed after its checkpoint at step k and resumed from a *fresh*
  initial state ends with bit-identical state and logs the same metrics for steps k+1..N as
  an uninterrupted run (the data iterator's position is restored from the checkpoint);
* SIGTERM at step j: the loop saves step j, returns ``preempted=True`` and the process lives
  on; resuming continues to N and matches the uninterrupted run;
* a NaN loss at step j raises ``NonFiniteLossError`` naming step j, and the newest checkpoint
  on disk is from before j and holds finite parameters;
* an update that makes the state non-finite while its loss is still finite is never
  checkpointed (``checkpoint_every=1``), nor is one whose gradient norm is NaN;
* a bit-flipped newest checkpoint: the loop resumes from the older one (one warning naming
  both steps), rewrites the newer steps and ends bit-identical to the uninterrupted run;
* a run SIGKILLed a few steps after a checkpoint (a real subprocess) and resumed leaves
  exactly one ``metrics.jsonl`` row per step;
* stall detection on a real diverged SFT run (``lr=1e6``), exit codes, preemption guard;
* a checkpoint of another model (other ``d_model``) is refused with a ``ValueError`` naming a
  leaf (or the differing fingerprint field);
* evaluation cadence, and re-running a finished loop is a no-op.

Data: a real ``BatchIterator`` (shuffled, epochs wrapping) over a small ``SFTDataset`` of
synthetic token sequences, so the iterator position round-trips through checkpoint meta.
Parameters are random NumPy values (no NNX init compile); the SFT step compiles once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.checkpoint import (Checkpointer, CheckpointError, NonFiniteStateError, abstract_like,
                                 model_fingerprint)
from rlhf_jax.config import ModelConfig
from rlhf_jax.data.datasets import SFTDataset
from rlhf_jax.data.records import DataStats
from rlhf_jax.data.tokenize import SFTExample
from rlhf_jax.metrics import MetricsLogger, read_jsonl
from rlhf_jax.models.model import Model
from rlhf_jax.train.guards import (NonFiniteLossError, PreemptionGuard, StallDetector,
                                   TrainingStalledError, check_finite)
from rlhf_jax.train.loop import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_NON_FINITE, EXIT_OK,
                                 EXIT_PREEMPTED, EXIT_STALLED, LoopConfig, TrainingPreempted,
                                 exit_code, run_loop)
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
    from rlhf_jax.data.config import BatchConfig
    return BatchConfig(batch_size=BATCH, buckets=(16,), seed=3, remainder="wrap")


def place(batch):
    return jax.device_put(batch, jax.devices()[0])


def loop(out_dir, *, total_steps=N, checkpoint_every=2, step_fn=STEP, state=None,
         resume=True, loss_key="sft/loss", fingerprint=None, eval_fn=None, eval_every=0,
         stall_steps=0):
    logger = MetricsLogger(out_dir, tensorboard=False)
    try:
        state = fresh_state() if state is None else state
        return run_loop(stage="sft", step_fn=step_fn, state=state, batches=batches(), place=place,
                        out_dir=out_dir,
                        cfg=LoopConfig(total_steps=total_steps, checkpoint_every=checkpoint_every,
                                       resume=resume, eval_every=eval_every,
                                       stall_steps=stall_steps),
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
    # re-running the finished loop redoes only the final evaluation; its row is not doubled
    again = loop(tmp_path, total_steps=5, checkpoint_every=0, eval_fn=eval_fn, eval_every=2)
    assert [r["step"] for r in again.records] == [5]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in rows if r["stage"] == "sft_eval"] == [
        ("sft_eval", 2), ("sft_eval", 4), ("sft_eval", 5)]
    assert [r["step"] for r in rows if r["stage"] == "sft"] == [1, 2, 3, 4, 5]


def test_loop_config_validation():
    with pytest.raises(ValueError, match="total_steps"):
        LoopConfig(total_steps=-1)
    with pytest.raises(ValueError, match="max_to_keep"):
        LoopConfig(total_steps=1, max_to_keep=0)
    with pytest.raises(ValueError, match="stall_steps"):
        LoopConfig(total_steps=1, stall_steps=-1)
    cfg = LoopConfig(total_steps=3)
    assert (cfg.checkpoint_every, cfg.max_to_keep, cfg.eval_every, cfg.resume,
            cfg.stall_steps) == (0, 2, 0, True, 0)


# --------------------------------------------------------------------------------------------
# Faults: non-finite updates, damaged checkpoints, SIGKILL, stalls, exit codes
# --------------------------------------------------------------------------------------------


def _blow_up_at(j, what):
    """Step ``j`` returns finite loss metrics but a non-finite state (``"state"``: the
    embedding becomes inf) or a NaN gradient norm (``"grad_norm"``)."""
    calls = {"n": 0}

    def step(state, batch):
        state, metrics = STEP(state, batch)
        calls["n"] += 1
        if calls["n"] == j:
            if what == "state":
                trunk = state.params["trunk"]
                params = {**state.params, "trunk": {**trunk, "embed": trunk["embed"] * jnp.inf}}
                state = state.replace(params=params)
            else:
                metrics = {**metrics, "train/grad_norm": (jnp.asarray(jnp.nan), jnp.asarray(1.0))}
        return state, metrics
    return step


def _assert_latest_finite(out_dir, expected_step):
    ckpt = Checkpointer(out_dir / "checkpoints")
    assert ckpt.latest_step() == expected_step
    state, meta = ckpt.restore(abstract_like(fresh_state()))  # verified: checksums + finite
    ckpt.close()
    assert meta["step"] == expected_step == int(state.step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_non_finite_update_is_never_checkpointed(tmp_path):
    """checkpoint_every=1: the loss of step 3 (computed before its update) is finite, the
    state it produced is not; the save of step 3 is refused and step 2 stays the newest."""
    with pytest.raises(NonFiniteLossError, match=r"non-finite state/params/trunk/embed \(inf\) "
                                                 r"at step 3\b") as info:
        loop(tmp_path, checkpoint_every=1, step_fn=_blow_up_at(3, "state"))
    assert isinstance(info.value.__cause__, NonFiniteStateError)
    assert exit_code(info.value) == EXIT_NON_FINITE
    _assert_latest_finite(tmp_path, 2)


def test_nan_grad_norm_stops(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"train/grad_norm \(nan\) at step 3\b") as info:
        loop(tmp_path, checkpoint_every=1, step_fn=_blow_up_at(3, "grad_norm"))
    assert info.value.name == "train/grad_norm" and info.value.step == 3
    _assert_latest_finite(tmp_path, 2)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_bit_flipped_newest_checkpoint_resumes_from_older(tmp_path, reference, caplog):
    ref_state, ref_records, _ = reference
    loop(tmp_path)  # checkpoints 4 and 6, metrics rows 1..6
    files = [p for p in (tmp_path / "checkpoints" / str(N) / "state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    path = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))

    with caplog.at_level("WARNING", logger="rlhf_jax.checkpoint"):
        resumed = loop(tmp_path)
    warnings_ = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert any(f"step {N} is unusable" in w and f"restored step {N - 2} instead" in w
               for w in warnings_), warnings_
    assert [r["step"] for r in resumed.records] == [N - 1, N]  # redone, not skipped
    assert_bit_identical(host(resumed.state), ref_state)
    # one row per step; the unusable step is kept aside, the rewritten one is good
    assert without_time(read_jsonl(tmp_path / "metrics.jsonl")) == without_time(ref_records)
    assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints" / "unusable").iterdir()] \
        == [str(N)]
    _assert_latest_finite(tmp_path, N)


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    loop(tmp_path, total_steps=2, checkpoint_every=0)  # one checkpoint: step 2
    (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text("")
    never = lambda s, b: pytest.fail("no step may run without a usable checkpoint")  # noqa: E731
    with pytest.raises(CheckpointError) as info:
        loop(tmp_path, step_fn=never)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "checkpoints") in msg and "step 2" in msg
    assert "'meta'" in msg
    assert exit_code(info.value) == EXIT_FAILURE


_KILL_SCRIPT = textwrap.dedent("""
    # A tiny loop (quadratic loss, Adam) that sleeps between steps so it can be killed mid-run.
    import os, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np, optax
    from rlhf_jax.metrics import MetricsLogger
    from rlhf_jax.train.loop import LoopConfig, run_loop

    out_dir, total, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    tx = optax.adam(0.1)

    class Batches:
        def __init__(self):
            self.i = 0
        def __next__(self):
            self.i += 1
            return np.full((4,), self.i, np.float32)
        def state_dict(self):
            return {"i": self.i}
        def load_state_dict(self, d):
            self.i = d["i"]

    @jax.jit
    def step(state, batch):
        def loss_fn(w):
            return jnp.mean((w - batch / 10.0) ** 2)
        loss, g = jax.value_and_grad(loss_fn)(state["w"])
        updates, opt = tx.update(g, state["opt"])
        one = jnp.ones((), jnp.float32)
        return ({"w": optax.apply_updates(state["w"], updates), "opt": opt},
                {"toy/loss": (loss, one), "train/grad_norm": (optax.global_norm(g), one)})

    def slow_step(state, batch):
        time.sleep(sleep)
        return step(state, batch)

    w = jnp.zeros((4,), jnp.float32)
    logger = MetricsLogger(out_dir, tensorboard=False)
    result = run_loop(stage="toy", step_fn=slow_step, state={"w": w, "opt": tx.init(w)},
                      batches=Batches(), place=jnp.asarray, out_dir=out_dir,
                      cfg=LoopConfig(total_steps=total, checkpoint_every=4), logger=logger)
    logger.close()
    print("DONE", result.step)
""")


def test_sigkill_and_resume_leave_one_metrics_row_per_step(tmp_path):
    script = tmp_path / "toy_loop.py"
    script.write_text(_KILL_SCRIPT)
    total = 12
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}

    def run(out, sleep, **kw):
        return subprocess.Popen([sys.executable, str(script), str(out), str(total), str(sleep)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **kw)

    ref = run(tmp_path / "ref", 0.0)
    killed_dir = tmp_path / "killed"
    proc = run(killed_dir, 0.3)
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # wait for a row 2 steps past the checkpoint of step 4
            if proc.poll() is not None:
                pytest.fail(f"the loop ended before it was killed: {proc.communicate()}")
            rows = metrics.read_text().splitlines() if metrics.exists() else []
            if any(json.loads(r)["step"] >= 6 for r in rows if r.endswith("}")):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the loop did not reach step 6 in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = [r["step"] for r in read_jsonl(metrics)]
    assert Checkpointer(killed_dir / "checkpoints").latest_step() == 4
    assert max(before) >= 6  # rows 5, 6 ... were logged past the checkpoint

    resumed = run(killed_dir, 0.0)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"DONE {total}" in out
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]

    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert without_time(rows) == without_time(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))


@pytest.fixture(scope="module")
def huge_lr_step():
    """The real SFT step with lr=1e6: after one update the loss sits at ln V with a gradient
    norm of exactly 0 (the divergence found by hand with ``--sft.optimizer.lr 1e6``)."""
    opt = OptimizerConfig(lr=1e6, warmup_steps=0, schedule="constant", total_steps=N)
    tx = make_optimizer(opt, _random_params(TINY))
    step = make_sft_step(MODEL, tx)
    return tx, step


def test_stalled_run_stops(tmp_path, huge_lr_step):
    tx, step = huge_lr_step
    calls = []
    state = create_train_state(_random_params(TINY), tx, jax.random.key(0))
    with pytest.raises(TrainingStalledError) as info:
        loop(tmp_path, total_steps=30, checkpoint_every=0, stall_steps=4, state=state,
             step_fn=lambda s, b: calls.append(1) or step(s, b))
    e = info.value
    # step 1 moves the loss; steps 2..5 would be stalled, but step 2 is compared with step 1
    assert (e.stage, e.steps, e.step) == ("sft", 4, 6)
    assert abs(e.loss - np.log(TINY.vocab_size)) < 1e-5
    msg = str(e)
    assert "sft" in msg and "4 consecutive steps" in msg and "learning rate" in msg
    assert f"{e.loss!r}" in msg
    assert len(calls) <= 8  # stopped early, not after 30 steps
    assert exit_code(e) == EXIT_STALLED
    # the stalled steps were logged (they are real observations)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["train/grad_norm"] == 0.0 for r in rows[1:])


def test_stall_detector_rules():
    d = StallDetector("ppo", 2)
    d.update(1, {"loss": 1.0}, {"g/grad_norm": 0.0})
    d.update(2, {"loss": 1.0 + 1e-9}, {"g/grad_norm": 0.0})  # within float32 resolution
    assert d.count == 1
    d.update(3, {"loss": 1.1}, {"g/grad_norm": 0.0})         # the loss moved: reset
    assert d.count == 0
    d.update(4, {"loss": 1.1}, {"g/grad_norm": 1e-3})        # a gradient: not stalled
    d.update(5, {"loss": 1.1}, {})                           # no gradient norm: no evidence
    assert d.count == 0
    d.update(6, {"loss": 1.1}, {"g/grad_norm": 0.0})
    with pytest.raises(TrainingStalledError, match=r"ppo: .*2 consecutive steps \(6\.\.7\)"):
        d.update(7, {"loss": 1.1}, {"g/grad_norm": 0.0})
    StallDetector("x", 0).update(1, {"loss": 1.0}, {"g": 0.0})  # disabled


def test_exit_codes():
    assert (EXIT_OK, EXIT_PREEMPTED, EXIT_NON_FINITE, EXIT_STALLED) == (0, 75, 76, 77)
    assert exit_code(None) == EXIT_OK
    assert exit_code(TrainingPreempted("sft: stopped at step 3", stage="sft", step=3)) == 75
    assert exit_code(NonFiniteLossError(3, "sft/loss", float("nan"))) == 76
    assert exit_code(NonFiniteStateError(3, "params/w", float("inf"), "/x")) == 76
    assert exit_code(TrainingStalledError("sft: stalled", stage="sft", step=9, steps=4,
                                          loss=4.15)) == 77
    assert exit_code(RuntimeError("boom")) == EXIT_FAILURE == 1
    assert exit_code(CheckpointError("bad", "/x", {})) == EXIT_FAILURE
    assert exit_code(KeyboardInterrupt()) == EXIT_INTERRUPTED == 130
    assert exit_code(SystemExit(3)) == 3
    assert exit_code(SystemExit(None)) == 0
    assert exit_code(SystemExit("usage: ...")) == 1
    try:  # a wrapper raised `from` a known error keeps its status
        try:
            raise NonFiniteLossError(2)
        except NonFiniteLossError as inner:
            raise RuntimeError("stage sft failed") from inner
    except RuntimeError as outer:
        assert exit_code(outer) == EXIT_NON_FINITE


def test_preemption_guard_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.should_stop(1)
        assert guard.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_preemption_guard_sigint_optional():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard(sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C is not swallowed
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_check_finite():
    assert check_finite(jnp.float32(1.5), 3) == 1.5
    with pytest.raises(NonFiniteLossError, match="step 12") as e:
        check_finite(float("nan"), 12)
    assert e.value.step == 12 and e.value.name == "loss"
    with pytest.raises(NonFiniteLossError, match="ppo/loss.*step 4"):
        check_finite(np.array([np.inf]), 4, name="ppo/loss")
