"""One process of the two-process CPU test (launched by ``tests/test_multiprocess.py``).

Usage: ``python tests/_multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_DIR``

Each process has 2 CPU devices (4 global), joins the others through
``rlhf_jax.sharding.initialize_distributed`` (CPU collectives: gloo over TCP, the jax 0.10
default), then for each mesh in ``MESHES``: places the tiny model's parameters (fixed
key) on it, builds the global batch from this process's rows (``shard_batch``), runs the
sharded forward, gathers the logits and (process 0) writes ``OUT_DIR/<mesh name>.npy``. The first
mesh initialises the parameters sharded (``Model.init_sharded``); later meshes reshard them
(``jax.device_put`` to ``Model.param_shardings``).

The model and batch builders are imported by the test, so both sides use the same ones.
"""

from __future__ import annotations

import os
import sys

import numpy as np

NUM_LOCAL_DEVICES = 2
#: name -> ((data, fsdp, tensor) over the 4 global devices, global batch rows used). On
#: data2_fsdp2 each process feeds 2 rows, fewer than data x fsdp = 4.
MESHES = {"fsdp2_tensor2": ((1, 2, 2), 8), "data2_fsdp2": ((2, 2, 1), 4)}
BATCH, SEQ = 8, 10


def model_config():
    from rlhf_jax.config import ModelConfig
    return ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                       n_kv_heads=2, mlp_dim=64, max_positions=32)


def global_batch() -> dict[str, np.ndarray]:
    """The global host batch ``[BATCH, SEQ]`` (left padding of varying length)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, model_config().vocab_size, size=(BATCH, SEQ), dtype=np.int32)
    pad = rng.integers(0, SEQ // 2, size=(BATCH,))
    attn_mask = np.arange(SEQ)[None, :] >= pad[:, None]
    positions = np.maximum(np.cumsum(attn_mask, axis=-1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "positions": positions, "attn_mask": attn_mask}


def local_rows(mesh, batch_size: int) -> slice:
    """The contiguous rows of the global batch that this process's devices hold."""
    from rlhf_jax.sharding import batch_sharding
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [batch_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    return slice(min(starts), max(stops))


def main(port: int, process_id: int, num_processes: int, out_dir: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={NUM_LOCAL_DEVICES}"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default; explicit
    jax.config.update("jax_default_matmul_precision", "highest")
    from rlhf_jax import sharding
    from rlhf_jax.models.model import Model

    sharding.initialize_distributed(coordinator_address=f"127.0.0.1:{port}",
                                    num_processes=num_processes, process_id=process_id)
    from jax.experimental import multihost_utils

    assert jax.process_count() == num_processes, jax.process_count()
    assert jax.local_device_count() == NUM_LOCAL_DEVICES, jax.local_devices()
    assert jax.device_count() == NUM_LOCAL_DEVICES * num_processes, jax.devices()

    model = Model(model_config())
    batch = global_batch()

    def fwd(params, b):
        return b["scale"] * model.apply(params, b["tokens"], b["positions"], b["attn_mask"]).logits

    params = None
    for name, ((data, fsdp, tensor), batch_rows) in MESHES.items():
        mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
        if params is None:
            params = model.init_sharded(jax.random.key(0), mesh)
        else:
            # Reshard across processes (compiling another init costs tens of seconds on CPU).
            params = jax.device_put(params, model.param_shardings(mesh))
        rows = local_rows(mesh, batch_rows)
        local = {k: v[rows] for k, v in batch.items()}
        local["scale"] = np.float32(1.0)  # a scalar leaf: replicated
        with jax.set_mesh(mesh):
            global_b = sharding.shard_batch(local, mesh)
            assert global_b["tokens"].shape == (batch_rows, SEQ), global_b["tokens"].shape
            logits = jax.jit(fwd)(params, global_b)
            if name == "data2_fsdp2":  # 3 rows cannot split over this process's 2 batch shards
                try:
                    sharding.shard_batch({"tokens": batch["tokens"][:3]}, mesh)
                    raise AssertionError("shard_batch accepted 3 rows on 2 local batch shards")
                except ValueError as e:
                    assert "has 3 rows on process" in str(e) and "2 batch shards" in str(e), e
        assert not logits.is_fully_addressable
        gathered = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
        if process_id == 0:
            np.save(os.path.join(out_dir, f"{name}.npy"), gathered)
        print(f"process {process_id}: {name} rows {rows.start}:{rows.stop} ok", flush=True)

    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
