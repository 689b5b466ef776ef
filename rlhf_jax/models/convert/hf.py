"""Hugging Face checkpoints (``config.json`` + safetensors) <-> ``rlhf_jax`` parameter trees.

Supported ``model_type`` values: those of the registered families
(``rlhf_jax.models.families``; ``SUPPORTED_MODEL_TYPES``; ``smollm`` reads as ``llama``,
SmolLM/SmolLM2 ship ``model_type: llama`` anyway). This module reads
and writes the weights (``list_safetensors``, ``load_hf_checkpoint``, ``save_hf_checkpoint``);
``hf_config`` maps ``config.json`` <-> ``ModelConfig`` (``read_hf_config``, ``config_from_hf``,
``hf_config_dict``, importable from here too) and ``hf_names`` maps each HF tensor name and
layout to our parameter leaves.

Layouts (each family's ``tensors``, ``hf_names``). HF ``nn.Linear`` weights ``[out, in]``
become our ``[in..., out...]`` kernels with heads split out and every block parameter stacked
over layers on axis 0; fused projections (GPT-2's ``c_attn``, GPT-NeoX's
``query_key_value``, Phi-3's ``qkv_proj``/``gate_up_proj``) split into ours; tied
embeddings have no LM-head tensor.

Scalar head. Our reward/value head (``value_head``: kernel ``[D]``, bias ``[]``) is stored as
``score.weight [1, D]`` and ``score.bias [1]``, the names of HF's
``*ForSequenceClassification`` with ``num_labels=1``. A ``kind="scalar"`` export writes
``architectures: [LlamaForSequenceClassification]`` (each family its own class), which HF loads
with the score weight; HF's classifier has no bias, so it ignores ``score.bias`` (logged as an
unexpected key) and its reward differs from ours by that constant, which a Bradley-Terry
reward is invariant to. Our own reload is lossless. A ``kind="lm_value"`` export is a
``*ForCausalLM`` checkpoint plus the two ``score.*`` tensors. Importing an HF
sequence-classification checkpoint without ``score.bias`` gives bias 0.

Large models. ``load_hf_checkpoint(..., shardings=...)`` builds each parameter directly into
its target sharding (``jax.make_array_from_callback``: every device receives only its slice,
host memory holds one stacked parameter at a time). ``save_hf_checkpoint`` gathers one
parameter at a time to the host (``jax.device_get``, or
``multihost_utils.process_allgather`` for arrays spanning processes); only process 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from rlhf_jax.models.convert.hf_config import (CONFIG_FILE, LLAMA_MODEL_TYPES,
                                               SUPPORTED_MODEL_TYPES, config_from_hf,
                                               default_model_type, hf_config_dict,
                                               read_hf_config)
from rlhf_jax.models.convert.hf_names import (SCORE_BIAS, SCORE_WEIGHT, _expand, _ignorable,
                                              _Spec, _specs)
from rlhf_jax.models.model import Model, Params

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
#: Tokenizer files copied by ``save_hf_checkpoint(tokenizer=<dir>)``.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def _np_dtype(name: str):
    return ml_dtypes.bfloat16 if str(name) == "bfloat16" else np.dtype(name)


def list_safetensors(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name -> (file, shape, dtype) of every tensor of a checkpoint directory (headers only).

    Reads ``model.safetensors.index.json`` (sharded) or ``model.safetensors``.

    Raises:
      FileNotFoundError: neither weights file exists, or a shard named in the index is missing.
      ValueError: the index names a tensor its shard lacks.
    """
    from safetensors import safe_open

    root = Path(path)
    index, single = root / INDEX_FILE, root / WEIGHTS_FILE
    if index.is_file():
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        found = sorted(p.name for p in root.glob("*")) if root.is_dir() else []
        raise FileNotFoundError(
            f"no safetensors weights in {root}: expected {WEIGHTS_FILE} or {INDEX_FILE} "
            f"(found: {found[:20]}); convert .bin checkpoints with transformers' "
            "save_pretrained(safe_serialization=True)")
    out: dict[str, TensorInfo] = {}
    for fname in files:
        fpath = root / fname
        if not fpath.is_file():
            raise FileNotFoundError(f"safetensors shard {fpath} listed in {index} does not exist")
        with safe_open(fpath, framework="np") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = TensorInfo(fpath, tuple(sl.get_shape()), str(sl.get_dtype()))
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in out or out[name].file.name != fname:
                raise ValueError(f"{index} maps tensor {name!r} to {fname}, which does not "
                                 "contain it")
    return out


def _detect_prefix(names: Sequence[str], arch: str) -> str:
    from rlhf_jax.models.families import get_family

    base = get_family(arch).prefix
    return base if any(n.startswith(base) for n in names) else ""


_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtype_name(dtype) -> str:
    name = str(jnp.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"parameter dtype must be float32 or bfloat16, got {dtype!r}")
    return _DTYPE_ALIASES[name]


def _resolve_shardings(model: Model, shardings):
    if shardings is None:
        return None
    if isinstance(shardings, jax.sharding.Mesh):
        return model.param_shardings(shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, model.abstract_params())
    return shardings


def _get_path(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set_path(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _place(host: np.ndarray, sharding) -> jax.Array:
    """Put a host array on devices; with a sharding each device receives only its slice."""
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def load_hf_checkpoint(path: str | os.PathLike, *, kind: str = "lm", dtype=None,
                       shardings=None, rng: jax.Array | None = None,
                       config_overrides: Mapping[str, Any] | None = None) -> tuple[Model, Params]:
    """Load an HF checkpoint directory into ``(Model(cfg, kind), params)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or a sharded
        ``model.safetensors.index.json`` (base-model checkpoints without the ``model.`` /
        ``transformer.`` prefix work too).
      kind: ``"lm"``, ``"lm_value"`` or ``"scalar"``. A scalar head (``score.weight [1, D]``,
        optional ``score.bias [1]``) is loaded when present, else initialised from ``rng``
        as ``rlhf_jax.models.model.with_head`` would (same key stream; computed under
        ``jit`` so only the head is materialised, equal up to float rounding). ``kind="scalar"`` drops an
        untied ``lm_head.weight`` and ``kind="lm"`` drops ``score.*`` (each logged).
      dtype: parameter storage dtype (``"float32"``/``"bfloat16"``); default float32. Sets
        ``ModelConfig.param_dtype``.
      shardings: ``None`` (default device), a ``Mesh`` (the model's rule-table shardings), one
        ``Sharding`` for every leaf, or a tree of shardings matching the parameters. Each
        parameter is built on its devices from a host copy of that parameter only.
      rng: typed key for a freshly initialised scalar head (default ``jax.random.key(0)``).
      config_overrides: ``ModelConfig`` fields to override (``dtype``, ``remat``, ...).

    Returns:
      ``(model, params)`` with ``params`` matching ``model.init``'s tree.

    Raises:
      FileNotFoundError: ``config.json`` or the weights (or a shard) is missing, naming it.
      ValueError: unsupported config; a missing tensor, an unexpected tensor, or a shape
        mismatch, naming the tensor, the file and the expected vs found shape.
    """
    from safetensors import safe_open

    root = Path(path)
    overrides = dict(config_overrides or {})
    if dtype is not None:
        overrides["param_dtype"] = _dtype_name(dtype)
    cfg = config_from_hf(root, **overrides)
    model = Model(cfg, kind)
    raw = list_safetensors(root)
    stored = {cfg.family.legacy_names.get(n, n): n for n in raw}  # current name -> stored name
    infos = {n: raw[o] for n, o in stored.items()}
    prefix = _detect_prefix(list(infos), cfg.arch)
    has_score = SCORE_WEIGHT in infos
    want_score = kind != "lm"
    want_lm_head = kind != "scalar" and not cfg.tie_embeddings
    specs = _specs(cfg, prefix, lm_head=want_lm_head, score=want_score and has_score)
    if want_score and has_score and SCORE_BIAS not in infos:
        specs = [s for s in specs if s.hf != SCORE_BIAS]

    # Validate every name and shape from the headers before reading any data.
    expected: dict[str, _Spec] = {}
    for s in specs:
        for name in _expand(s, cfg.n_layers):
            expected[name] = s
    for name, s in expected.items():
        if name not in infos:
            files = sorted({str(i.file) for i in infos.values()})
            raise ValueError(f"tensor {name!r} is missing from the checkpoint {root} "
                             f"(files: {files}); expected shape {s.shape} for {cfg.arch} "
                             f"with {cfg.n_layers} layers")
        if tuple(infos[name].shape) != tuple(s.shape):
            raise ValueError(f"tensor {name!r} in {infos[name].file} has shape "
                             f"{tuple(infos[name].shape)}, expected {tuple(s.shape)} for config "
                             f"{root / CONFIG_FILE}")
    dropped = []
    for name, info in infos.items():
        if name in expected or _ignorable(name, cfg.arch):
            continue
        if name in (SCORE_WEIGHT, SCORE_BIAS) and not want_score:
            dropped.append(name)
        elif name == cfg.family.lm_head_name and (kind == "scalar" or cfg.tie_embeddings):
            dropped.append(name)
        else:
            raise ValueError(f"unexpected tensor {name!r} (shape {info.shape}) in {info.file}: "
                             f"not part of a {cfg.arch} checkpoint with kind={kind!r} "
                             f"(HF names are expected with prefix {prefix!r})")
    if dropped:
        log.info("load_hf_checkpoint(%s, kind=%r): not loading %s", root, kind, dropped)

    abstract = model.abstract_params()
    target = _resolve_shardings(model, shardings)
    np_dt = _np_dtype(cfg.param_dtype)
    params: dict = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="np"))
                   for f in sorted({i.file for i in infos.values()})}

        def read(name):
            return handles[infos[name].file].get_tensor(stored[name])

        for s in specs:
            for j, leaf in enumerate(s.ours):
                if s.per_layer:
                    host = np.stack([s.to_ours(read(n))[j] for n in _expand(s, cfg.n_layers)])
                    if s.experts:  # [L E, ...] layer-major -> [L, E, ...]
                        host = host.reshape(cfg.n_layers, s.experts, *host.shape[1:])
                else:
                    host = s.to_ours(read(s.hf))[j]
                host = np.asarray(host.astype(np_dt), order="C")
                want = _get_path(abstract, leaf)
                if host.shape != tuple(want.shape):  # a mapping bug, not bad input
                    raise AssertionError(f"{leaf}: built {host.shape}, model wants {want.shape}")
                sharding = None if target is None else _get_path(target, leaf)
                _set_path(params, leaf, _place(host, sharding))
        head = cfg.family.lm_head_name
        if cfg.tie_embeddings and head in infos and kind != "scalar":
            if not np.array_equal(read(head), read(prefix + cfg.family.embed_name)):
                raise ValueError(f"{root / CONFIG_FILE} says tie_word_embeddings=True but "
                                 f"{head} in {infos[head].file} differs from "
                                 "the input embedding")

    if want_score and not has_score:
        rng = jax.random.key(0) if rng is None else rng
        # with_head(params, model, rng)["value_head"], jitted: XLA computes only the head.
        head = jax.jit(lambda r: model.init(r)["value_head"])(rng)
        if target is not None:
            head = jax.device_put(head, target["value_head"])
        params["value_head"] = head
        log.info("load_hf_checkpoint(%s, kind=%r): no %s in the checkpoint; value head "
                 "initialised", root, kind, SCORE_WEIGHT)
    elif want_score and SCORE_BIAS not in infos:
        params["value_head"]["bias"] = _place(np.zeros((), np_dt),
                                              None if target is None else target["value_head"]["bias"])
    _check_tree(model, params)
    return model, params


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
def _check_tree(model: Model, params: Params) -> None:
    """Raise ``ValueError`` unless ``params`` has ``model``'s tree structure and shapes."""
    want = jax.tree_util.tree_flatten_with_path(model.abstract_params())[0]
    try:
        have = jax.tree_util.tree_flatten_with_path(params)[0]
        jax.tree.map(lambda a, b: None, model.abstract_params(), params)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"params do not match the tree of Model(kind={model.kind!r}): {e}") from e
    for (path, w), (_, h) in zip(want, have):
        if tuple(w.shape) != tuple(np.shape(h)):
            raise ValueError(f"params{jax.tree_util.keystr(path)} has shape {tuple(np.shape(h))}, "
                             f"Model(kind={model.kind!r}) expects {tuple(w.shape)}")


def _to_host(x) -> np.ndarray:
    """Gather one (possibly sharded, possibly multi-process) array to a host NumPy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _write_tokenizer(tokenizer, out: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
        return
    src = Path(tokenizer)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory {src} does not exist")
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not copied:
        raise FileNotFoundError(f"no tokenizer files in {src} (looked for {TOKENIZER_FILES})")
    for n in copied:
        shutil.copyfile(src / n, out / n)


def save_hf_checkpoint(model: Model, params: Params, path: str | os.PathLike, *,
                       tokenizer=None, max_shard_bytes: int = 5 * 10**9,
                       dtype=None, model_type: str | None = None,
                       config_extra: Mapping[str, Any] | None = None,
                       generation_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``params`` as an HF checkpoint directory that ``transformers`` loads.

    ``AutoModelForCausalLM.from_pretrained(path)`` loads ``kind="lm"``/``"lm_value"`` exports;
    ``AutoModelForSequenceClassification`` loads ``kind="scalar"`` ones (see module docstring
    for the ``score.*`` head). Existing ``model*.safetensors`` files in ``path`` are removed.

    A LoRA model (``cfg.lora``) is written merged: every adapter folded into its kernel,
    ``W + (alpha / r) A B`` (``rlhf_jax.models.lora.merge_adapters``), a quantised base
    dequantised first; the result is an ordinary checkpoint of the architecture.

    Args:
      model: the ``Model`` whose tree ``params`` is.
      params: parameter tree (host or device arrays, sharded or not, even spanning
        processes; every process must call this, only process 0 writes).
      path: output directory (created).
      tokenizer: an HF tokenizer (``save_pretrained`` is called) or a directory whose
        tokenizer files are copied; ``None`` writes none.
      max_shard_bytes: shard the weights into ``model-0000k-of-0000n.safetensors`` + index
        when they exceed this many bytes.
      dtype: stored dtype (``"float32"``/``"bfloat16"``); default ``cfg.param_dtype``.
      model_type: HF model type (default ``default_model_type(cfg)``; e.g. ``"mistral"``).
      config_extra: keys merged into ``config.json`` (``bos_token_id``, ``eos_token_id``, ...);
        bos/eos/pad ids default to the ``tokenizer`` object's, else ``null``.
      generation_config: if given, written as ``generation_config.json``.

    Returns:
      ``path``.

    Raises:
      ValueError: ``params`` does not match ``model``'s tree, or ``model_type`` cannot
        express the config.
    """
    from safetensors.numpy import save_file

    if model.cfg.lora is not None:
        from rlhf_jax.models.lora import merge_adapters
        model, params = merge_adapters(model, params)
    cfg = model.cfg
    out = Path(path)
    dtype = _dtype_name(dtype or cfg.param_dtype)
    np_dt = _np_dtype(dtype)
    extra = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # from a tokenizer object
        if getattr(tokenizer, key, None) is not None:
            extra[key] = int(getattr(tokenizer, key))
    extra.update(config_extra or {})
    config = hf_config_dict(cfg, kind=model.kind, model_type=model_type, dtype=dtype,
                            extra=extra)
    _check_tree(model, params)
    prefix = cfg.family.prefix
    specs = _specs(cfg, prefix, lm_head=model.kind != "scalar" and not cfg.tie_embeddings,
                   score=model.kind != "lm")
    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
            old.unlink(missing_ok=True)

    shards: list[list[str]] = []
    buf: dict[str, np.ndarray] = {}
    buf_bytes = 0
    weight_map: dict[str, str] = {}
    total = 0

    def flush():
        nonlocal buf, buf_bytes
        if buf and writer:
            name = f"_partial-{len(shards):05d}.safetensors"
            save_file(buf, str(out / name), metadata={"format": "pt"})
            shards.append(list(buf))
        elif buf:
            shards.append(list(buf))
        buf, buf_bytes = {}, 0

    for s in specs:
        leaves = [_to_host(_get_path(params, p)) for p in s.ours]  # one gather per leaf
        if s.experts:  # [L, E, ...] -> [L E, ...], the order of _expand's names
            leaves = [x.reshape(-1, *x.shape[2:]) for x in leaves]
        for i, name in enumerate(_expand(s, cfg.n_layers)):
            parts = [x[i] for x in leaves] if s.per_layer else leaves
            t = np.asarray(np.asarray(s.to_hf(*parts)).astype(np_dt), order="C")
            if buf and buf_bytes + t.nbytes > max_shard_bytes:
                flush()
            buf[name] = t
            buf_bytes += t.nbytes
            total += t.nbytes
        del leaves
    flush()

    if writer:
        n = len(shards)
        if n == 1:
            os.replace(out / "_partial-00000.safetensors", out / WEIGHTS_FILE)
        else:
            for k, names in enumerate(shards):
                final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                os.replace(out / f"_partial-{k:05d}.safetensors", out / final)
                weight_map.update({nm: final for nm in names})
            with open(out / INDEX_FILE, "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2, sort_keys=True)
        with open(out / CONFIG_FILE, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if generation_config is not None:
            with open(out / GENERATION_CONFIG_FILE, "w") as f:
                json.dump(dict(generation_config), f, indent=2, sort_keys=True)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, out)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"save_hf_checkpoint:{out}")
    return out


__all__ = ["CONFIG_FILE", "LLAMA_MODEL_TYPES", "SCORE_BIAS", "SCORE_WEIGHT",
           "SUPPORTED_MODEL_TYPES", "TensorInfo", "config_from_hf", "default_model_type",
           "hf_config_dict", "list_safetensors", "load_hf_checkpoint", "read_hf_config",
           "save_hf_checkpoint"]
