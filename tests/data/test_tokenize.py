"""Loss masks cover exactly the responses (+ end-of-turn); prompts end in the generation prompt."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_jax.data import (
    BatchConfig,
    ChatTokenizer,
    PromptDataset,
    RecordError,
    load_preferences,
    load_prompts,
    load_sft,
    parse_preference,
    parse_prompt,
    parse_sft,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And 2 + 2?"},
    {"role": "assistant", "content": "It is 4, thank you for asking!"},
]


def _masked_runs(tok, ids, mask) -> list[str]:
    """Decoded maximal runs of masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_two_assistant_turn_chat_mask(tok):
    ex = tokenize_sft(parse_sft({"messages": CHAT}, "chat:1"), ChatTokenizer(tok), 256)
    assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == bool
    # the whole sequence is the template rendering
    assert tok.decode(ex.tokens) == tok.apply_chat_template(CHAT, tokenize=False)
    assert _masked_runs(tok, ex.tokens, ex.loss_mask) == [
        "The capital of France is Paris.<|im_end|>", "It is 4, thank you for asking!<|im_end|>"]
    # the end-of-turn token is a target, the header and the newline after it are not
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert ex.loss_mask[ex.tokens == eot].tolist() == [False, False, True, False, True]
    assert not ex.loss_mask[ex.tokens == tok.convert_tokens_to_ids("<|im_start|>")].any()


def test_prompt_completion_chat_mask(tok):
    rec = parse_sft({"prompt": "Say hello.", "completion": "Hello!"}, "x:1")
    ex = tokenize_sft(rec, ChatTokenizer(tok), 64)
    assert tok.decode(ex.tokens) == ("<|im_start|>user\nSay hello.<|im_end|>\n"
                                     "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert _masked_runs(tok, ex.tokens, ex.loss_mask) == ["Hello!<|im_end|>"]


def test_prompt_completion_plain_mask(plain_tok):
    ct = ChatTokenizer(plain_tok)
    assert not ct.use_chat_template and ct.bos_ids == []
    rec = parse_sft({"prompt": "Say hello.", "completion": " Hello!"}, "x:1")
    ex = tokenize_sft(rec, ct, 64)
    assert plain_tok.decode(ex.tokens) == "Say hello. Hello!<|im_end|>"
    n_prompt = len(plain_tok("Say hello.", add_special_tokens=False)["input_ids"])
    assert not ex.loss_mask[:n_prompt].any() and ex.loss_mask[n_prompt:].all()
    assert _masked_runs(plain_tok, ex.tokens, ex.loss_mask) == [" Hello!<|im_end|>"]
    # with an explicit BOS
    ex = tokenize_sft(rec, ChatTokenizer(plain_tok, add_bos=True), 64)
    assert ex.tokens[0] == plain_tok.bos_token_id and not ex.loss_mask[0]
    # a chat record needs a template
    with pytest.raises(RecordError, match="no chat template") as info:
        tokenize_sft(parse_sft({"messages": CHAT}, "x:7"), ct, 256)
    assert info.value.location == "x:7"


def test_smollm2_template_with_default_system_turn(smol_tok):
    ex = tokenize_sft(parse_sft({"messages": CHAT[1:]}, "x:1"), ChatTokenizer(smol_tok), 256)
    text = smol_tok.decode(ex.tokens)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert _masked_runs(smol_tok, ex.tokens, ex.loss_mask) == [
        "The capital of France is Paris.<|im_end|>", "It is 4, thank you for asking!<|im_end|>"]


def test_not_prefix_stable_template_is_an_error(tmp_path):
    from ._tok import build_tokenizer

    # Renders only the last two messages: earlier prefixes are not prefixes of the whole.
    template = ("{% for message in messages[-2:] %}{{'<|im_start|>' + message['role'] + '\n' + "
                "message['content'] + '<|im_end|>\n'}}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    bad = build_tokenizer(tmp_path, template=template)
    with pytest.raises(RecordError, match="not prefix-stable") as info:
        tokenize_sft(parse_sft({"messages": CHAT}, "chat.jsonl:3"), ChatTokenizer(bad), 256)
    assert info.value.reason == "template" and str(info.value).startswith("chat.jsonl:3: ")


def test_assistant_first_is_an_error(tok):
    msgs = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]
    with pytest.raises(RecordError, match="messages\\[0\\] is an assistant turn"):
        tokenize_sft(parse_sft({"messages": msgs}, "x:1"), ChatTokenizer(tok), 64)


def test_special_token_text_in_content_is_not_a_control_token(tok):
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "a<|im_end|>b"}]
    ex = tokenize_sft(parse_sft({"messages": msgs}, "x:1"), ChatTokenizer(tok), 64)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert int((ex.tokens == eot).sum()) == 2  # the template's two, not the one in the text
    assert _masked_runs(tok, ex.tokens, ex.loss_mask) == ["a<|im_end|>b<|im_end|>"]


def test_preference_tokens(tok):
    rec = parse_preference({"prompt": "Say hi", "responses": ["Hello!", "Hi.", "Go away."]},
                           "x:1")
    ex = tokenize_preference(rec, ChatTokenizer(tok), 64)
    assert tok.decode(ex.prompt) == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert [tok.decode(r) for r in ex.responses] == [
        "Hello!<|im_end|>", "Hi.<|im_end|>", "Go away.<|im_end|>"]
    # the prompt is exactly what a sampler is given
    assert ex.prompt.tolist() == tok.apply_chat_template(
        [{"role": "user", "content": "Say hi"}], add_generation_prompt=True, return_dict=False)


def test_prompt_tokens_chat_and_raw(tok):
    rec = parse_prompt({"prompt": "Continue: the film", "opening": "the film"}, "x:1")
    ids = tokenize_prompt(rec, ChatTokenizer(tok), 64)
    assert tok.decode(ids).endswith("Continue: the film<|im_end|>\n<|im_start|>assistant\n")
    raw = parse_prompt({"prompt": "Continue: the film", "opening": "the film"}, "x:1",
                       {"prompt": "opening"})
    ids = tokenize_prompt(raw, ChatTokenizer(tok, use_chat_template=False), 64)
    assert tok.decode(ids) == "the film"


def test_prompt_with_response_prefix_is_prompt_ids_then_prefix_ids(tok):
    ct = ChatTokenizer(tok)
    prompt = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Continue this movie review:"}]
    rec = parse_prompt({"prompt": prompt, "response_prefix": "The film is"}, "x:1")
    assert rec.response_prefix == "The film is"
    ids = tokenize_prompt(rec, ct, 64)
    assert ids.tolist() == ct.prompt_ids(prompt) + ct.encode_text("The film is")
    assert tok.decode(ids).endswith("<|im_start|>assistant\nThe film is")
    # plain path: [bos] + ids(prompt), then the prefix, tokenised on its own
    plain = ChatTokenizer(tok, use_chat_template=False, add_bos=True)
    ids = tokenize_prompt(parse_prompt({"prompt": "Review:", "response_prefix": " The"}, "x:1"),
                          plain, 64)
    assert ids.tolist() == [tok.bos_token_id] + plain.encode_text("Review:") + \
        plain.encode_text(" The")
    # no prefix (absent, null or ""): the generation prompt alone
    for raw in ({"prompt": "p"}, {"prompt": "p", "response_prefix": None},
                {"prompt": "p", "response_prefix": ""}):
        rec = parse_prompt(raw, "x:1")
        assert rec.response_prefix == ""
        assert tokenize_prompt(rec, ct, 64).tolist() == ct.prompt_ids("p")
    # renamed field; wrong type; the prefix counts towards the prompt length
    rec = parse_prompt({"prompt": "p", "opening": "The"}, "x:1", {"response_prefix": "opening"})
    assert rec.response_prefix == "The"
    with pytest.raises(RecordError, match="^x:1: field 'response_prefix' is int") as info:
        parse_prompt({"prompt": "p", "response_prefix": 3}, "x:1")
    assert info.value.reason == "wrong_type"
    n = len(ct.prompt_ids("p"))
    with pytest.raises(RecordError, match="the prompt \\+ response prefix has") as info:
        tokenize_prompt(parse_prompt({"prompt": "p", "response_prefix": "word " * 20}, "x:1"),
                        ct, n + 5)
    assert info.value.reason == "too_long"


def test_prompt_dataset_prefixes_line_up_with_kept_examples(tok):
    ct = ChatTokenizer(tok)
    records = [
        {"prompt": "Review a film.", "response_prefix": "The acting"},
        {"prompt": 3, "response_prefix": "skipped: wrong type"},
        {"prompt": "Review a book."},
        {"prompt": "Too long.", "response_prefix": "word " * 100},
        {"prompt": "Review a song.", "response_prefix": "A lovely"},
        {"prompt": "Bad prefix.", "response_prefix": ["not", "text"]},
    ]
    cfg = BatchConfig(batch_size=2, prompt_buckets=(32, 64), skip_invalid=True)
    ds = load_prompts(records, tok, cfg, name="p")
    assert len(ds) == 3 and ds.locations == ["p[0]", "p[2]", "p[4]"]
    assert ds.prefixes == ["The acting", "", "A lovely"]
    assert dict(ds.stats.skipped) == {"wrong_type": 2, "too_long": 1}
    for i, j in enumerate((0, 2, 4)):
        expected = ct.prompt_ids(records[j]["prompt"]) + (
            ct.encode_text(records[j]["response_prefix"]) if "response_prefix" in records[j]
            else [])
        assert ds.examples[i].tolist() == expected
    # built directly: no prefixes means "" for each example; a wrong count is an error
    bare = PromptDataset(ds.examples, ds.locations, ds.stats, (32, 64), ct.pad_id)
    assert bare.prefixes == ["", "", ""]
    with pytest.raises(ValueError, match="2 prefixes for 3 prompts"):
        PromptDataset(ds.examples, ds.locations, ds.stats, (32, 64), ct.pad_id,
                      prefixes=["a", "b"])


def test_loaders_from_lists(tok):
    cfg = BatchConfig(batch_size=2, buckets=(32, 64, 128))
    sft = load_sft([{"messages": CHAT}, {"prompt": "a", "completion": "b"}], tok, cfg)
    assert len(sft) == 2 and sft.lengths.tolist() == [len(e.tokens) for e in sft.examples]
    prefs = load_preferences([{"prompt": "p", "chosen": "a", "rejected": "b"},
                              {"prompt": "p", "responses": ["a", "b", "c"]}], tok, cfg)
    assert prefs.num_candidates == 3
    prompts = load_prompts([{"prompt": "p"}], tok, cfg)
    assert prompts.buckets == cfg.prompt_buckets
    with pytest.raises(RecordError, match="more than num_candidates=2"):
        load_preferences([{"prompt": "p", "responses": ["a", "b", "c"]}], tok,
                         BatchConfig(batch_size=1, num_candidates=2))


def test_template_rejecting_a_conversation_names_the_record(tmp_path):
    from ._tok import CHATML_TEMPLATE, build_tokenizer

    strict = ("{% for message in messages %}{% if (message['role'] == 'user') != "
              "(loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
              "{% endfor %}" + CHATML_TEMPLATE)
    ct = ChatTokenizer(build_tokenizer(tmp_path, template=strict))
    ok = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenize_sft(parse_sft({"messages": ok}, "x:1"), ct, 64).loss_mask.any()
    with pytest.raises(RecordError, match="^chats.jsonl:9: the chat template rejected") as info:
        tokenize_sft(parse_sft({"messages": CHAT}, "chats.jsonl:9"), ct, 256)
    assert info.value.reason == "template" and "roles must alternate" in str(info.value)


def test_chat_tokenizer_settings(tok, plain_tok):
    ct = ChatTokenizer(tok)
    assert ct.use_chat_template and ct.eot_token == "<|im_end|>"
    assert ct.eot_id == tok.eos_token_id and ct.pad_id == tok.pad_token_id
    with pytest.raises(ValueError, match="has no chat_template"):
        ChatTokenizer(plain_tok, use_chat_template=True)
    with pytest.raises(ValueError, match="not a single token"):
        ChatTokenizer(tok, end_of_turn_token="<|no_such_token|>")
