"""Checkpoint converters.

* ``hf``: HF ``config.json`` + safetensors directories <-> parameter trees (every family of
  ``rlhf_jax.models.families``: Llama/SmolLM/Mistral/Qwen2, GPT-2, Qwen3, Gemma 1-3,
  GPT-NeoX/Pythia, Phi-3, OLMo 2), incl. sharded loading into target shardings;
  ``hf_config`` maps the configs and ``hf_names`` the weight names, each through the
  family's own tables.
* ``gguf``: llama.cpp GGUF files -> parameters, config and an HF tokenizer directory.
* ``smollm2``: real SmolLM2-135M-Instruct weights fetched through the package index.
"""

from rlhf_jax.models.convert.gguf import config_from_gguf, load_gguf, tokenizer_from_gguf
from rlhf_jax.models.convert.hf import (
    SUPPORTED_MODEL_TYPES,
    config_from_hf,
    hf_config_dict,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from rlhf_jax.models.convert.smollm2 import fetch_smollm2

__all__ = ["SUPPORTED_MODEL_TYPES", "config_from_gguf", "config_from_hf", "fetch_smollm2",
           "hf_config_dict", "load_gguf", "load_hf_checkpoint", "save_hf_checkpoint",
           "tokenizer_from_gguf"]
