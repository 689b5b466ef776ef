"""Checkpoint converters.

* ``hf``: HF ``config.json`` + safetensors directories <-> parameter trees (Llama, Mistral,
  Qwen2, SmolLM, GPT-2), incl. sharded loading into target shardings; ``hf_config`` maps
  the configs, ``hf_names`` the weight names.
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
