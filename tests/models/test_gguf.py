"""GGUF loading: a tiny Llama written with ``gguf.GGUFWriter`` the way llama.cpp's converter
writes it (q/k rows permuted, some tensors Q8_0-quantised) loads to the same logits as the
torch model; the GGUF tokenizer metadata becomes a working HF tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ._bpe import bytes_to_unicode

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from ._hf import randomize_  # noqa: E402

from rlhf_jax.models.convert.gguf import load_gguf, tokenizer_from_gguf, unpermute_qk  # noqa: E402
from rlhf_jax.models.model import Model  # noqa: E402
from rlhf_jax.types import positions_from_mask  # noqa: E402

TOL = 1e-4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "Ġ a", "i n"]  # "1 2" must never fire (digits split)
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _vocab():
    byte_chars = list(bytes_to_unicode().values())
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + byte_chars + merged


def _llamacpp_permute(weights, n_head, n_head_kv=None):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (reference, verbatim semantics)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _write_gguf(path, hf, *, tied: bool):
    c = hf.config
    tokens = _vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    h, hkv = c.num_attention_heads, c.num_key_value_heads
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _llamacpp_permute(sd[p + "self_attn.q_proj.weight"], h, h))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llamacpp_permute(sd[p + "self_attn.k_proj.weight"], h, hkv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        for ours, theirs in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            # Quantised like llama.cpp does; the torch model gets the dequantised values.
            wq = gguf.quants.quantize(sd[p + f"mlp.{theirs}.weight"], q8)
            w.add_tensor(f"blk.{i}.{ours}.weight", wq, raw_dtype=q8)
            deq = gguf.quants.dequantize(wq, q8).reshape(sd[p + f"mlp.{theirs}.weight"].shape)
            getattr(hf.model.layers[i].mlp, theirs).weight.data = torch.from_numpy(deq.copy())
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_llama(tied: bool):
    torch.manual_seed(0)
    c = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, vocab_size=len(_vocab()), max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=tied)
    return randomize_(transformers.LlamaForCausalLM(c), seed=1)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_logits_match_transformers(tmp_path, tied):
    hf = _tiny_llama(tied)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf, tied=tied)
    cfg, params, meta = load_gguf(path)
    assert cfg.tie_embeddings == tied and ("lm_head" in params) == (not tied)
    assert (cfg.n_heads, cfg.num_kv_heads, cfg.n_layers, cfg.vocab_size) == (4, 2, 2, len(_vocab()))
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    model = Model(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[1, :6] = False
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    ours = np.asarray(jax.jit(lambda p: model.apply(p, tokens, pos, mask).logits)(params))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
    diff = float(np.abs(ours - theirs)[mask].max())
    print(f"gguf tied={tied}: max|dlogits| = {diff:.2e} (scale {np.abs(theirs).max():.1f})")
    assert np.abs(theirs).max() > 1.0
    assert diff <= TOL


def test_unpermute_inverts_llamacpp_permutation():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for n in (1, 3, 6):
        np.testing.assert_array_equal(unpermute_qk(_llamacpp_permute(w, n), n), w)


def test_tokenizer_from_gguf(tmp_path):
    from transformers import AutoTokenizer

    hf = _tiny_llama(True)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf, tied=True)
    _, _, meta = load_gguf(path)
    tokenizer_from_gguf(meta, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    vocab = _vocab()
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token_id == 1 and tok.pad_token_id == 2 and tok.unk_token_id == 0
    ids = tok("the 12 a<|im_end|>", add_special_tokens=True)["input_ids"]
    # "the" -> t,he (merge "Ġt he" needs the space); " 12" -> Ġ,1,2 (digits never merge).
    assert [vocab[i] for i in ids] == ["t", "he", "Ġ", "1", "2", "Ġa", "<|im_end|>"]
    for text in ["the cat in a hat", "naïve 日本 🤗\n\t x  y", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unsupported_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported"):
        load_gguf(path)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")
