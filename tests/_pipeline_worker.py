"""One process of the two-process pipeline test (``tests/test_pipeline.py``).

Usage: ``python tests/_pipeline_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_DIR``

Each process has 4 CPU devices (8 global), joins the others through
``rlhf_jax.sharding.initialize_distributed`` and runs the test's tiny pipeline on the same
``(data=2, fsdp=2, tensor=2)`` mesh as the single-process run, writing into ``OUT_DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

NUM_LOCAL_DEVICES = 4


def main(port: int, process_id: int, num_processes: int, out_dir: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={NUM_LOCAL_DEVICES}"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    from rlhf_jax import sharding
    sharding.initialize_distributed(coordinator_address=f"127.0.0.1:{port}",
                                    num_processes=num_processes, process_id=process_id)
    assert jax.device_count() == NUM_LOCAL_DEVICES * num_processes, jax.devices()
    from test_pipeline import tiny_config

    from rlhf_jax.pipeline import run_pipeline
    run_pipeline(tiny_config(Path(out_dir)))
    print(f"process {process_id}: pipeline ok", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
