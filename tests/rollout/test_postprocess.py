"""Post-processing: EOS truncation vs a plain loop, training-side response log-probs vs a float64
NumPy reference, decoding to text."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.model import Model
from rlhf_jax.rollout import decode, decode_ids, response_logprobs, truncate_at_eos
from rlhf_jax.types import positions_from_mask


def _truncate_loop(tokens, eos_ids, pad):
    toks = tokens.copy()
    mask = np.zeros(tokens.shape, bool)
    ended = np.zeros(tokens.shape[0], bool)
    for b in range(tokens.shape[0]):
        for r in range(tokens.shape[1]):
            mask[b, r] = True
            if tokens[b, r] in eos_ids:
                ended[b] = True
                toks[b, r + 1:] = pad
                break
    return toks, mask, ended


@pytest.mark.parametrize("eos", [4, (4, 7)])
def test_truncate_at_eos_matches_loop(eos):
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, 10, size=(32, 9)).astype(np.int32)
    tokens[0, 0] = 4          # EOS first
    tokens[1, :] = 1          # never ends
    tokens[2, -1] = 4         # EOS last
    tokens[2, :-1] = 2
    ids = (eos,) if isinstance(eos, int) else eos
    want = _truncate_loop(tokens, ids, pad=0)
    got = jax.jit(truncate_at_eos, static_argnums=(1, 2))(jnp.asarray(tokens), eos, 0)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)
    assert got[0].dtype == jnp.int32 and got[1].dtype == jnp.bool_
    assert not bool(got[2][1]) and bool(got[2][0]) and bool(got[1][2].all())


def test_response_logprobs_matches_float64_reference():
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64)
    model = Model(cfg)
    params = model.init(jax.random.key(1))
    p, r, tau = 4, 5, 0.6
    rs = np.random.RandomState(2)
    tokens = rs.randint(1, 40, size=(3, p + r)).astype(np.int32)
    mask = np.ones((3, p + r), bool)
    mask[0, :2] = False          # left padding
    mask[1, p + 3:] = False      # response ended after 3 tokens
    tokens[~mask] = 0
    positions = positions_from_mask(jnp.asarray(mask))
    got = jax.jit(response_logprobs, static_argnames=("model", "prompt_len"))(
        model, params, jnp.asarray(tokens), jnp.asarray(mask), positions, prompt_len=p,
        temperature=tau)
    assert got.shape == (3, r) and got.dtype == jnp.float32
    logits = np.asarray(model.apply(params, jnp.asarray(tokens), positions,
                                    jnp.asarray(mask)).logits, np.float64) / tau
    want = np.zeros((3, r))
    for b in range(3):
        for j in range(r):
            if mask[b, p + j]:
                z = logits[b, p + j - 1]  # the logits that predict token p + j
                want[b, j] = z[tokens[b, p + j]] - (z.max() + np.log(np.exp(z - z.max()).sum()))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert np.all(np.asarray(got)[1, 3:] == 0.0)
    with pytest.raises(ValueError, match="prompt_len"):
        response_logprobs(model, params, jnp.asarray(tokens), jnp.asarray(mask), positions,
                          prompt_len=p + r, temperature=tau)


class _StubTokenizer:
    """Maps id i to the letter chr(97 + i); ids >= 20 are 'special' (e.g. EOS)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i) for i in ids if not (skip_special_tokens and i >= 20))


def test_decode_drops_masked_slots_and_special_tokens():
    response = jnp.asarray([[0, 1, 2, 25, 9], [3, 4, 5, 6, 7]], jnp.int32)
    mask = jnp.asarray([[True, True, True, True, False], [True, True, False, False, False]])
    tok = _StubTokenizer()
    assert decode(tok, response, mask) == ["abc", "de"]
    assert decode(tok, response, mask, skip_special_tokens=False) == ["abc" + chr(97 + 25), "de"]
    assert decode_ids(response, mask) == [[0, 1, 2, 25], [3, 4]]
    with pytest.raises(ValueError, match="response_mask"):
        decode(tok, response, mask[:, :3])


def test_decode_with_a_real_hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<pad>": 0, "<eos>": 1, "hello": 2, "world": 3, "again": 4}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.decoder = tokenizers.decoders.WordPiece()  # joins with spaces
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>",
                                              eos_token="<eos>")
    response = np.array([[2, 3, 1, 0], [4, 2, 3, 3]], np.int32)
    mask = np.array([[True, True, True, False], [True, True, True, True]])
    assert decode(hf, response, mask) == ["hello world", "again hello world world"]
    assert decode(hf, response, mask, skip_special_tokens=False)[0] == "hello world <eos>"
