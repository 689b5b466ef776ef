"""Records -> token ids and loss masks, with a ``transformers`` tokenizer and its chat template.

Conventions (see ``rlhf_jax.types``): ids are ``int32``; ``loss_mask[t]`` is True when token
``t`` is a *target*: a response token, the end-of-turn token included, aligned with the
tokens (the one-token shift happens in ``losses.logprobs``).

* **SFT chats**: every assistant turn's content tokens and its end-of-turn token
  (``<|im_end|>`` for ChatML) are targets; system/user turns, the ``<|im_start|>assistant\\n``
  header and any template text after the end-of-turn token (ChatML's ``\\n``) are not. Turn
  boundaries come from rendering prefixes of the conversation with the template and taking
  token-length differences (the same idea as the ``{% generation %}`` masks of transformers,
  but working with any template): the prefix ``messages[:i]`` rendered with
  ``add_generation_prompt=True`` ends where assistant turn ``i``'s content starts, and
  ``messages[:i+1]`` ends after its turn. Each prefix's ids must be a prefix of the full
  conversation's ids; a template for which that fails (e.g. one that rewrites earlier turns)
  raises a ``RecordError`` with reason ``template`` rather than producing a wrong mask.
* **SFT prompt/completion**: with a chat template, a user turn + an assistant turn (as
  above); without, ``[bos] + ids(prompt) + ids(completion) + [eos]`` with the completion and
  eos as targets (prompt and completion tokenised separately, so the boundary is exact).
* **Preferences**: the prompt rendered as a generation prompt (``add_generation_prompt=True``;
  plain: ``[bos] + ids(prompt)``), then each response's ids + the end-of-turn token. This is
  exactly the token sequence a sampler produces after the same prompt.
* **Prompts**: rendered as a generation prompt (plain: ``[bos] + ids(prompt)``), followed by
  ``ids(response_prefix)`` when the record pre-fills the start of the response: the same
  tokens as a response that begins with that text (responses are encoded on their own, after
  the generation prompt, too).

Record text is always encoded as *text*: a string such as ``"<|im_end|>"`` inside a message
becomes ordinary tokens, never a control token (transformers' ``sanitize_control_tokens`` /
``split_special_tokens``), so data cannot inject turn boundaries.

**Truncation policy**: none. A record whose sequence (prompt + response, for every candidate)
is longer than ``max_length`` tokens raises ``RecordError`` (reason ``too_long``), or is
skipped and counted with ``skip_invalid=True``. Silently truncating would cut off the
end-of-turn token that teaches the model to stop, and would bias preference comparisons.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf_jax.data.records import (
    Message,
    PreferenceRecord,
    PromptRecord,
    RecordError,
    SFTRecord,
    as_messages,
)


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One tokenised demonstration.

    Attributes:
      tokens: ``[T] int32`` ids.
      loss_mask: ``[T] bool`` True on response targets.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """One tokenised comparison: a shared prompt and ``K`` responses, best first.

    Attributes:
      prompt: ``[P] int32`` prompt ids (generation prompt included).
      responses: ``K`` arrays ``[R_k] int32``, each ending with the end-of-turn token.
    """

    prompt: np.ndarray
    responses: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        """The longest candidate sequence ``P + max_k R_k``."""
        return len(self.prompt) + max(len(r) for r in self.responses)


class ChatTokenizer:
    """A ``transformers`` tokenizer plus the conventions the data layer needs.

    Args:
      tokenizer: a ``transformers`` tokenizer (``AutoTokenizer.from_pretrained(dir)``).
      use_chat_template: render with the chat template; ``None``: when the tokenizer has one.
      end_of_turn_token: token closing an assistant turn; ``None``: ``tokenizer.eos_token``.
      add_bos: plain path: prepend ``bos_token``; ``None``: when the tokenizer adds it itself.

    Raises:
      ValueError: ``use_chat_template=True`` without a template; no end-of-turn token; an
        end-of-turn token that is not a single token.
    """

    def __init__(self, tokenizer: Any, *, use_chat_template: bool | None = None,
                 end_of_turn_token: str | None = None, add_bos: bool | None = None):
        self.tokenizer = tokenizer
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if use_chat_template is None:
            use_chat_template = has_template
        if use_chat_template and not has_template:
            raise ValueError(f"use_chat_template=True but the tokenizer "
                             f"{getattr(tokenizer, 'name_or_path', '')!r} has no chat_template")
        self.use_chat_template = bool(use_chat_template)
        eot = end_of_turn_token or tokenizer.eos_token
        if eot is None:
            raise ValueError("the tokenizer has no eos_token; set end_of_turn_token")
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        unknown = (eot_id == getattr(tokenizer, "unk_token_id", None)
                   and eot != getattr(tokenizer, "unk_token", None))
        if eot_id is None or unknown:
            raise ValueError(f"end-of-turn token {eot!r} is not a single token of the vocabulary")
        self.eot_token, self.eot_id = eot, int(eot_id)
        pad_id = tokenizer.pad_token_id
        #: Id written into padding positions (``pad_token``, else the end-of-turn token). It
        #: never matters numerically: padding has ``attn_mask`` and ``loss_mask`` False.
        self.pad_id = int(pad_id if pad_id is not None else self.eot_id)
        bos_id = tokenizer.bos_token_id
        if add_bos is None:
            probe = tokenizer("a")["input_ids"]
            add_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
        if add_bos and bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token")
        self.bos_ids: list[int] = [int(bos_id)] if add_bos else []

    # ----------------------------------------------------------------- primitives

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text: no BOS/EOS added, special-token strings not matched."""
        return list(self.tokenizer(text, add_special_tokens=False,
                                   split_special_tokens=True)["input_ids"])

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool,
               location: str = "") -> list[int]:
        """Ids of ``messages`` rendered with the chat template (message text sanitised).

        Raises:
          RecordError: reason ``template`` when the template rejects the conversation (e.g.
            Llama-2/Mistral templates that ``raise_exception`` unless roles alternate).
        """
        import jinja2

        try:
            ids = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                tokenize=True, return_dict=False, sanitize_control_tokens=True)
        except jinja2.TemplateError as e:
            roles = [m["role"] for m in messages]
            raise RecordError(location, "template",
                              f"the chat template rejected the conversation with roles {roles}: "
                              f"{e}") from e
        return list(ids)

    def prompt_ids(self, prompt: str | Sequence[Message], location: str = "") -> list[int]:
        """Ids of a prompt ready for the model to continue with a response.

        Chat: the prompt (a string is one user turn) with ``add_generation_prompt=True``.
        Plain: ``[bos] + ids(prompt)``.

        Raises:
          RecordError: a chat-format prompt without a chat template (reason ``wrong_type``).
        """
        if self.use_chat_template:
            return self.render(as_messages(prompt), add_generation_prompt=True,
                               location=location)
        if not isinstance(prompt, str):
            raise RecordError(location, "wrong_type",
                              "the prompt is a list of messages but no chat template is used; "
                              "expected a string (or use_chat_template=True)")
        return self.bos_ids + self.encode_text(prompt)

    def response_ids(self, response: str) -> list[int]:
        """Ids of a response as generated after the prompt: ``ids(response) + [eot]``."""
        return self.encode_text(response) + [self.eot_id]


def _prefix_error(location: str, what: str, prefix: list[int], full: list[int],
                  tok: ChatTokenizer) -> RecordError:
    n = min(len(prefix), len(full))
    at = next((i for i in range(n) if prefix[i] != full[i]), n)
    dec = tok.tokenizer.decode
    return RecordError(
        location, "template",
        f"the chat template is not prefix-stable: {what} renders to {len(prefix)} tokens that "
        f"are not a prefix of the whole conversation's {len(full)} tokens (first difference at "
        f"token {at}: {dec(prefix[at:at + 8])!r} vs {dec(full[at:at + 8])!r}); expected each "
        "rendered prefix of the conversation to be a prefix of the full rendering, so the "
        "assistant turns can be delimited")


def chat_loss_mask(messages: Sequence[Message], tok: ChatTokenizer,
                   location: str = "") -> tuple[list[int], np.ndarray]:
    """Token ids of a chat and the mask of its assistant turns (content + end-of-turn token).

    Args:
      messages: the conversation ``[{"role", "content"}, ...]``.
      tok: the tokenizer (must use a chat template).
      location: for error messages.

    Returns:
      ``(ids, loss_mask)`` with ``ids`` a list of ``T`` ints and ``loss_mask`` ``[T] bool``.

    Raises:
      RecordError: reason ``template`` when a rendered prefix is not a prefix of the full
        rendering, or an assistant turn contains no end-of-turn token.
    """
    full = tok.render(messages, add_generation_prompt=False, location=location)
    mask = np.zeros(len(full), dtype=bool)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise RecordError(location, "bad_value",
                              "messages[0] is an assistant turn; expected a system or user turn "
                              "before the first assistant turn")
        head = tok.render(messages[:i], add_generation_prompt=True, location=location)
        turn = tok.render(messages[: i + 1], add_generation_prompt=False, location=location)
        for what, ids in ((f"messages[:{i}] + generation prompt", head),
                          (f"messages[:{i + 1}]", turn)):
            if full[: len(ids)] != ids:
                raise _prefix_error(location, what, ids, full, tok)
        start, end = len(head), len(turn)
        eots = [j for j in range(start, end) if full[j] == tok.eot_id]
        if end <= start or not eots:
            raise RecordError(
                location, "template",
                f"assistant turn messages[{i}] renders to tokens {start}..{end} with no "
                f"end-of-turn token {tok.eot_token!r}; expected the template to close each "
                "assistant turn with it (set end_of_turn_token)")
        mask[start: eots[-1] + 1] = True
    return full, mask


def _check_length(n: int, max_length: int, location: str, what: str) -> None:
    if n > max_length:
        raise RecordError(location, "too_long",
                          f"{what} has {n} tokens, longer than max_length={max_length}; "
                          "expected at most max_length (records are never truncated)")


def tokenize_sft(record: SFTRecord, tok: ChatTokenizer, max_length: int) -> SFTExample:
    """Tokenise a demonstration and mark its response tokens (see the module docstring).

    Args:
      record: a validated :class:`SFTRecord`.
      tok: the tokenizer.
      max_length: maximum ``T`` in tokens.

    Returns:
      :class:`SFTExample` with ``tokens [T] int32`` and ``loss_mask [T] bool``.

    Raises:
      RecordError: ``too_long``; ``template`` (see :func:`chat_loss_mask`); ``wrong_type``
        for a chat record without a chat template.
    """
    loc = record.location
    if record.messages is not None or tok.use_chat_template:
        if not tok.use_chat_template:
            raise RecordError(loc, "wrong_type",
                              "the record is a chat ('messages') but no chat template is used; "
                              "expected 'prompt'/'completion' (or use_chat_template=True)")
        messages = record.messages or (
            {"role": "user", "content": record.prompt},
            {"role": "assistant", "content": record.completion},
        )
        ids, mask = chat_loss_mask(messages, tok, loc)
    else:
        prompt = tok.bos_ids + tok.encode_text(record.prompt)
        response = tok.response_ids(record.completion)
        ids = prompt + response
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(prompt):] = True
    _check_length(len(ids), max_length, loc, "the sequence")
    return SFTExample(tokens=np.asarray(ids, dtype=np.int32), loss_mask=mask)


def tokenize_preference(record: PreferenceRecord, tok: ChatTokenizer,
                        max_length: int) -> PreferenceExample:
    """Tokenise a comparison: the generation prompt once, each response + end-of-turn token.

    Args:
      record: a validated :class:`PreferenceRecord` (responses best first).
      tok: the tokenizer.
      max_length: maximum ``P + R_k`` in tokens, checked for every candidate.

    Returns:
      :class:`PreferenceExample`.

    Raises:
      RecordError: ``too_long`` (naming the candidate); ``wrong_type`` for a chat prompt
        without a chat template.
    """
    prompt = tok.prompt_ids(record.prompt, record.location)
    responses = []
    for k, r in enumerate(record.responses):
        ids = tok.response_ids(r)
        _check_length(len(prompt) + len(ids), max_length, record.location,
                      f"prompt + response {k}")
        responses.append(np.asarray(ids, dtype=np.int32))
    return PreferenceExample(prompt=np.asarray(prompt, dtype=np.int32),
                             responses=tuple(responses))


def tokenize_prompt(record: PromptRecord, tok: ChatTokenizer, max_length: int) -> np.ndarray:
    """Tokenise an RL prompt: ``prompt_ids(prompt) + encode_text(response_prefix)``.

    Args:
      record: a validated :class:`PromptRecord`.
      tok: the tokenizer.
      max_length: maximum ``P`` in tokens (generation prompt and response prefix included).

    Returns:
      ``[P] int32`` ids: the generation prompt, then the pre-filled start of the response.

    Raises:
      RecordError: ``too_long``; ``wrong_type`` for a chat prompt without a chat template.
    """
    ids = tok.prompt_ids(record.prompt, record.location)
    if record.response_prefix:
        ids = ids + tok.encode_text(record.response_prefix)
    _check_length(len(ids), max_length, record.location,
                  "the prompt + response prefix" if record.response_prefix else "the prompt")
    return np.asarray(ids, dtype=np.int32)
