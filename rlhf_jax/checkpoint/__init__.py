"""Checkpoints of whole training states with orbax, restored straight into target shardings.

A checkpoint at step ``n`` is one orbax step directory with three items:

* ``state`` - the arrays of the state pytree (``TrainState``, ``PPOState``, a dict of them,
  optax states, ``None`` leaves ...), stored as a nested ``dict`` keyed by the pytree path
  (``{'policy': {'params': {'trunk': ...}}, 'opt_state': {'0': ...}}``), so any registered
  pytree node round-trips and the files are readable without this library. Typed PRNG keys
  are stored as their raw ``jax.random.key_data`` and re-wrapped with the target's key type
  on restore; callers never see the difference.
* ``meta`` - the caller's JSON ``dict``: config (``rlhf_jax.config.config_to_dict``),
  data-iterator position, controller scalars, a model fingerprint (``model_fingerprint``) ...
* ``layout`` - bookkeeping of this package: format version, which leaves were PRNG keys and
  their key type, and one checksum per array (below).

Typical use (``rlhf_jax.train.loop.run_loop`` adds SIGTERM handling and NaN stops)::

    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=3, save_interval_steps=500)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_like(state), expected_fingerprint=fingerprint)
    for step in ...:
        state, metrics = train_step(state, batch)
        ckpt.save(step, state, meta)               # no-op between intervals
    ckpt.close()

Good by construction:

* **Never a non-finite state.** ``save`` first checks every floating-point leaf (parameters,
  optimizer moments ...) for NaN/Inf and raises ``NonFiniteStateError`` naming the first bad
  leaf instead of writing anything.
* **Checksums.** ``save`` stores, per array, two 32-bit checksums of its raw bits: the sum of
  its 32-bit words, and the sum over words of MurmurHash3's ``fmix32(word + position *
  0x9E3779B9)`` (position = 1 + row-major index), both modulo 2**32 (2- and 1-byte dtypes are
  widened word by word, 8-byte ones split in two).
  They are computed on the device by one jitted reduction over the whole state (one per set
  of devices the leaves live on, normally one; host NumPy leaves form their own), which also
  yields the finiteness flags, so a save pulls one small array to the host; sharded arrays
  are reduced where they live (modular sums do not depend on the order or the sharding), and
  nothing is gathered on one host. ``restore`` recomputes them on the restored arrays, in
  their target shardings, and compares (leaves restored into another dtype are not compared).
  Any single flipped bit changes the first sum; other damage (zero-filled or misplaced
  blocks, several flips) changes the second with probability ``1 - 2**-32``. They detect
  damage, not tampering (they are not cryptographic).
* **Fallback.** ``restore()`` of the latest step tries the steps from newest to oldest: a
  step whose files are missing, truncated or corrupt, whose ``meta``/``layout`` JSON is empty
  or invalid, whose checksums do not match or whose values are not finite is skipped with one
  log line naming the bad and the restored step. If no step is usable it raises
  ``CheckpointError`` with a one-line message naming the directory and what is wrong with each
  step (library tracebacks go to ``logging.debug``). ``set_aside_after(step)`` then moves the
  unusable newer steps into ``<directory>/unusable/`` so the resumed run can save them again.

Nothing already saved is lost: orbax writes each step into a temporary directory and renames
it into place only once every item is complete; steps beyond ``max_to_keep`` (which must be
``>= 1``) are deleted only after the new step has been finalised, so the last good
checkpoint survives a crash or preemption in the middle of a save. Temporary directories left
by a killed process are removed when a ``Checkpointer`` opens the directory.

Errors name what was expected: a missing directory or step raises ``FileNotFoundError``
naming the directory (and the steps that exist); a checkpoint of another model raises
``ValueError`` naming the directory, the step and the first mismatching leaf path with the
expected and found shapes, or the differing fingerprint fields (no fallback: an older step of
the same directory would be of the same other model).

Modules: ``checkpointer`` (``Checkpointer``: save, restore with fallback, set-aside),
``errors`` (``CheckpointError``, ``NonFiniteStateError``), ``fingerprint``
(``model_fingerprint``), ``tree`` (state pytree <-> stored nested dict; ``abstract_like``,
``with_shardings``) and ``integrity`` (the checksums and finiteness flags). Import the public
names from here.
"""

from rlhf_jax.checkpoint.checkpointer import Checkpointer
from rlhf_jax.checkpoint.errors import CheckpointError, NonFiniteStateError
from rlhf_jax.checkpoint.fingerprint import model_fingerprint
from rlhf_jax.checkpoint.tree import abstract_like, with_shardings

__all__ = [
    "Checkpointer", "CheckpointError", "NonFiniteStateError", "abstract_like", "with_shardings",
    "model_fingerprint",
]
