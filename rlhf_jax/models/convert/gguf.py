"""GGUF (llama.cpp) files -> ``rlhf_jax`` parameters, config and an HF tokenizer directory.

Reads with PyPI ``gguf`` (``gguf.GGUFReader``) and dequantises every tensor to float32 with
``gguf.quants.dequantize`` (Q4_1, Q8_0, K-quants, F16, ... all NumPy). A quantised file gives
the *dequantised* weights: the model is the quantised model, not the original float one.

Only ``general.architecture == "llama"`` is supported (Llama, SmolLM2, Mistral-style files).

Layout notes (llama.cpp ``convert_hf_to_gguf.py``, ``LlamaModel.modify_tensors``):

* ggml lists dimensions fastest-first, so a tensor whose GGUF shape is ``[in, out]`` is a
  row-major NumPy ``[out, in]`` array: the HF ``nn.Linear`` layout.
* The converter permutes the rows of ``attn_q``/``attn_k`` from HF's rotate-half RoPE layout
  to GPT-J's interleaved one: ``w.reshape(n, 2, out/n/2, in).swapaxes(1, 2)`` with ``n`` the
  head count (kv-head count for k). We undo it:
  ``w.reshape(n, out/n/2, 2, in).swapaxes(1, 2).reshape(out, in)``.
* Tensor names: ``token_embd``, ``blk.N.attn_{q,k,v,output}``, ``blk.N.ffn_{gate,up,down}``,
  ``blk.N.attn_norm``, ``blk.N.ffn_norm``, ``output_norm``, ``output`` (absent: tied
  embeddings).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ModelConfig, RopeScaling
from rlhf_jax.models.model import Params

log = logging.getLogger(__name__)

#: GGUF token types (llama.cpp ``llama_token_type``).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

#: llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) whose regexes are "each digit alone,
#: then GPT-2's regex" (llama-vocab.cpp), i.e. HF ``Digits(individual_digits=True)`` +
#: ``ByteLevel(use_regex=True)``, the pipeline of SmolLM2's own ``tokenizer.json``.
DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                        "minerva")
GPT2_PRE = ("gpt-2", "gpt2")


def _reader(src):
    import gguf

    if isinstance(src, gguf.GGUFReader):
        return src
    p = Path(src)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {p} does not exist")
    return gguf.GGUFReader(p)


def gguf_metadata(src) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (or reader) as plain Python values."""
    r = _reader(src)
    out = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            out[name] = field.contents()
        except Exception as e:  # pragma: no cover - exotic field types
            log.warning("GGUF metadata %s unreadable (%s); skipped", name, e)
    return out


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of a q/k projection ``w [out, in]``.

    ``w.reshape(n, out/n/2, 2, in).swapaxes(1, 2).reshape(out, in)``; ``n_head`` is the head
    count for q and the kv-head count for k.
    """
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (``convert_hf_to_gguf.LlamaModel.permute``), the inverse of
    ``unpermute_qk``: HF rotate-half rows -> interleaved rows."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def config_from_gguf(meta: Mapping[str, Any], *, where: str = "GGUF", **overrides) -> ModelConfig:
    """A ``ModelConfig`` from GGUF metadata (``llama.*`` keys; vocab from the token list).

    Raises:
      ValueError: architecture other than ``llama``, partial rotary, or an unsupported rope
        scaling type, naming the key.
    """
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{where}: general.architecture {arch!r} is not supported (supported: "
                         "'llama')")

    def get(key, default=None):
        k = f"llama.{key}"
        if k not in meta and default is None:
            raise ValueError(f"{where}: metadata key {k!r} is missing")
        return meta.get(k, default)

    d, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", d // n_heads))
    rot = int(meta.get("llama.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"{where}: llama.rope.dimension_count={rot} != head_dim={head_dim} "
                         "(partial rotary embeddings are not supported)")
    scaling = None
    stype = meta.get("llama.rope.scaling.type")
    if stype not in (None, "none"):
        if stype != "linear":
            raise ValueError(f"{where}: llama.rope.scaling.type {stype!r} is not supported "
                             "(supported: none, linear)")
        scaling = RopeScaling(rope_type="linear", factor=float(meta["llama.rope.scaling.factor"]))
    if "tokenizer.ggml.tokens" in meta:
        vocab = len(meta["tokenizer.ggml.tokens"])
    else:
        vocab = int(get("vocab_size"))
    def f32(x) -> float:
        """GGUF stores float32: the shortest decimal that rounds to it (9.99999974e-06 -> 1e-05)."""
        return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))

    kw = dict(arch="llama", vocab_size=vocab, d_model=d, n_layers=int(get("block_count")),
              n_heads=n_heads, n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
              head_dim=None if head_dim == d // n_heads else head_dim,
              mlp_dim=int(get("feed_forward_length")),
              max_positions=int(meta.get("llama.context_length", 2048)),
              rope_theta=f32(meta.get("llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
              norm_eps=f32(get("attention.layer_norm_rms_epsilon")))
    kw.update(overrides)
    return ModelConfig(**kw)


def load_gguf(path: str | os.PathLike, *, dtype: str | None = None,
              **config_overrides) -> tuple[ModelConfig, Params, dict[str, Any]]:
    """Load a llama-architecture GGUF file as ``(cfg, params, metadata)`` for ``Model(cfg)``.

    Quantised tensors are dequantised to float32 (``gguf.quants.dequantize``), q/k rows are
    un-permuted (module docstring), layers are stacked on axis 0, and ``tie_embeddings`` is
    set when the file has no ``output.weight``. RoPE frequencies come from
    ``llama.rope.freq_base`` (and ``llama.rope.scaling.*`` when linear).

    Args:
      path: the ``.gguf`` file.
      dtype: parameter dtype (``"float32"`` default, or ``"bfloat16"``).
      **config_overrides: ``ModelConfig`` fields to override.

    Returns:
      ``cfg``; ``params`` (the ``Model(cfg, "lm").init`` tree of jax arrays); ``metadata``
      (every GGUF key/value, incl. ``tokenizer.*`` for ``tokenizer_from_gguf``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: unsupported architecture/metadata, a missing or unexpected tensor, or a
        shape mismatch, naming the tensor and the file.
    """
    import gguf

    r = _reader(path)
    where = str(path)
    meta = gguf_metadata(r)
    tensors = {t.name: t for t in r.tensors}
    tied = "output.weight" not in tensors
    if dtype is not None:
        config_overrides["param_dtype"] = dtype
    cfg = config_from_gguf(meta, where=where, tie_embeddings=tied, **config_overrides)
    d, f, v, L = cfg.d_model, cfg.mlp_dim, cfg.vocab_size, cfg.n_layers
    h, hkv, k = cfg.n_heads, cfg.num_kv_heads, cfg.per_head_dim

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"tensor {name!r} is missing from {where} (expected NumPy shape "
                             f"{shape})")
        t = tensors[name]
        np_shape = tuple(int(x) for x in reversed([int(s) for s in t.shape]))
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if np_shape != shape or w.size != int(np.prod(shape)):
            raise ValueError(f"tensor {name!r} in {where} has shape {np_shape} (GGUF dims "
                             f"{[int(s) for s in t.shape]}), expected {shape}")
        return w.reshape(shape)

    used: set[str] = set()

    def layer(name: str, shape, fn=lambda w: w):
        names = [f"blk.{i}.{name}.weight" for i in range(L)]
        used.update(names)
        return np.stack([fn(read(n, shape)) for n in names])

    attn = {
        "q": {"kernel": layer("attn_q", (h * k, d), lambda w: unpermute_qk(w, h).T.reshape(d, h, k))},
        "k": {"kernel": layer("attn_k", (hkv * k, d),
                              lambda w: unpermute_qk(w, hkv).T.reshape(d, hkv, k))},
        "v": {"kernel": layer("attn_v", (hkv * k, d), lambda w: w.T.reshape(d, hkv, k))},
        "o": {"kernel": layer("attn_output", (d, h * k), lambda w: w.T.reshape(h, k, d))},
    }
    mlp = {"gate": {"kernel": layer("ffn_gate", (f, d), lambda w: w.T)},
           "up": {"kernel": layer("ffn_up", (f, d), lambda w: w.T)},
           "down": {"kernel": layer("ffn_down", (d, f), lambda w: w.T)}}
    blocks = {"attn": attn, "mlp": mlp, "attn_norm": {"scale": layer("attn_norm", (d,))},
              "mlp_norm": {"scale": layer("ffn_norm", (d,))}}
    used.update(["token_embd.weight", "output_norm.weight", "output.weight"])
    params: dict = {"trunk": {"embed": read("token_embd.weight", (v, d)), "blocks": blocks,
                              "final_norm": {"scale": read("output_norm.weight", (d,))}}}
    if not tied:
        params["lm_head"] = {"kernel": read("output.weight", (v, d)).T}
    extra = sorted(set(tensors) - used)
    if extra:
        hint = (" (rope_freqs.weight: Llama 3.1 rope scaling in a GGUF is not supported)"
                if "rope_freqs.weight" in extra else "")
        raise ValueError(f"unexpected tensors {extra[:5]} in {where}{hint}")
    np_dt = jnp.dtype(cfg.param_dtype)
    params = jax.tree.map(lambda x: jnp.asarray(np.ascontiguousarray(x), np_dt), params)
    return cfg, params, meta


def tokenizer_from_gguf(src, out_dir: str | os.PathLike | None = None):
    """Build an HF fast tokenizer from GGUF tokenizer metadata (and save it to ``out_dir``).

    Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) from ``tokenizer.ggml.tokens`` (id =
    index) and ``tokenizer.ggml.merges``; control tokens (type 3) become special added tokens,
    user-defined ones (type 4) added tokens; bos/eos/unk/pad from
    ``tokenizer.ggml.{bos,eos,unknown,padding}_token_id``; BOS is prepended only when
    ``tokenizer.ggml.add_bos_token`` is true; ``tokenizer.chat_template`` is kept. The
    pre-tokenizer follows ``tokenizer.ggml.pre``: ``smollm`` (and llama.cpp's other
    "digits, then GPT-2 regex" names) -> ``Digits(individual_digits=True)`` + ``ByteLevel``,
    as in SmolLM2's ``tokenizer.json``; ``gpt-2`` -> ``ByteLevel``.

    Args:
      src: GGUF metadata dict (``load_gguf``'s third output), a ``GGUFReader`` or a path.
      out_dir: if given, ``save_pretrained`` there so ``AutoTokenizer.from_pretrained(out_dir)``
        works offline.

    Returns:
      The ``transformers`` fast tokenizer.

    Raises:
      ValueError: a non-BPE tokenizer model or an unknown pre-tokenizer name.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    meta = src if isinstance(src, Mapping) else gguf_metadata(src)
    tmodel = meta.get("tokenizer.ggml.model")
    if tmodel != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model {tmodel!r} is not supported (supported: "
                         "'gpt2' byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens has duplicate entries")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                          use_regex=True)
    if pre in DIGITS_THEN_GPT2_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in GPT2_PRE:
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported (supported: "
                         f"{', '.join(DIGITS_THEN_GPT2_PRE + GPT2_PRE)})")
    tok.decoder = decoders.ByteLevel()

    def tok_id(key):
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if v is None or not 0 <= int(v) < len(tokens) else int(v)

    bos, eos, unk, pad = (tok_id(k) for k in ("bos", "eos", "unknown", "padding"))
    special_ids = [i for i, t in enumerate(types) if t == TOKEN_CONTROL]
    for i in (bos, eos, unk, pad):
        if i is not None and i not in special_ids:
            special_ids.append(i)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in sorted(special_ids)])
    user = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(tokens[i], normalized=False) for i in user])
    for i in special_ids + user:
        if tok.token_to_id(tokens[i]) != i:  # would mean the vocab and added tokens disagree
            raise ValueError(f"token {tokens[i]!r} did not keep id {i}")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    named = {i for i in (bos, eos, unk, pad) if i is not None}
    kwargs = dict(
        tokenizer_object=tok,
        bos_token=None if bos is None else tokens[bos],
        eos_token=None if eos is None else tokens[eos],
        unk_token=None if unk is None else tokens[unk],
        pad_token=None if pad is None else tokens[pad],
        additional_special_tokens=[tokens[i] for i in sorted(special_ids) if i not in named],
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
        model_max_length=int(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length",
                                      2048)),
    )
    hf_tok = PreTrainedTokenizerFast(**kwargs)
    if meta.get("tokenizer.chat_template"):
        hf_tok.chat_template = meta["tokenizer.chat_template"]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        hf_tok.save_pretrained(str(out))
    return hf_tok


def generation_config_from_gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``generation_config.json`` contents (bos/eos/pad ids) from GGUF tokenizer metadata."""
    out = {}
    for key, hf in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        if v is not None:
            out[hf] = int(v)
    return out
