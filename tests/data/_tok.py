"""A tiny real tokenizer built in memory (no hub): byte-level BPE + ChatML template.

It mirrors SmolLM2-Instruct's layout: ``<|endoftext|>`` (pad), ``<|im_start|>``,
``<|im_end|>`` (EOS, the end-of-turn token) and a ChatML ``chat_template``, and is
saved to a directory and loaded back with ``AutoTokenizer.from_pretrained`` so the
library's real code path (a ``PreTrainedTokenizerFast``) is exercised.
"""

from __future__ import annotations

import pathlib

# SmolLM2-135M-Instruct's template, minus its default system prompt (kept optional below).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The exact SmolLM2-Instruct template (injects a default system turn when there is none).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short movie review. This film is a delight from start to finish.",
    "The plot was good, but the characters are dull and the dialog is not great.",
    "Hello! How are you today? I am fine, thank you for asking.",
    "Continue this movie review: the acting is superb and the music is lovely.",
    "A really bad, horrible book. At least it isn't a horrible movie.",
    "Numbers like 1, 2, 3 and 42 appear in text; so do punctuation marks: !?;:-()'\".",
    "system user assistant You are a helpful assistant.",
]


def build_tokenizer(directory: str | pathlib.Path, *, template: str | None = CHATML_TEMPLATE,
                    vocab_size: int = 400):
    """Train a byte-level BPE on a few sentences, save it to ``directory``, load it back.

    Returns:
      A ``transformers`` fast tokenizer with eos ``<|im_end|>``, pad ``<|endoftext|>``,
      bos ``<|im_start|>`` (not added automatically) and the given chat template (``None``:
      no template, for the plain-concatenation path).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    if template is not None:
        fast.chat_template = template
    directory = pathlib.Path(directory)
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
