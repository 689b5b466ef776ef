"""Test configuration: 8 fake CPU devices, float32 matmuls at full precision, no hub access,
and a persistent XLA compilation cache shared by the test processes (the pipeline tests
compile the same stage programs in several runs; only programs that take over a second to
compile are cached)."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"rlhf_jax_tests_xla_cache_{os.getuid()}"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
