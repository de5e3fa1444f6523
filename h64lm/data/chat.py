"""Conversations in Mistral's v1 instruct format, with the loss on the assistant's tokens only.

The format belongs to the tokenizer's owner: ids come from mistral-common's
`encode_chat_completion`, never from hand-written `[INST]` strings. A conversation
(an optional system prompt, then user / assistant turns, ending with an assistant turn) encodes as

    <s>▁[INST]▁{system}\\n\\n{user 1}▁[/INST]▁{assistant 1}</s>▁[INST]▁{user 2}▁[/INST]▁{assistant 2}</s>

(v1 has no system role: the prompt joins the first user turn). Each assistant turn's tokens,
closing `</s>` included, are what the model learns to produce; the rest is context. They are found
by encoding the conversation up to each user turn and up to each assistant turn: the format
concatenates one encoding per message, so the assistant turn is the difference of the two lengths
(checked on every conversation, not assumed).

`CHAT_TEMPLATE` is the Jinja template that makes a Hugging Face tokenizer's `apply_chat_template`
produce the same ids (tests/data/test_chat.py compares them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from h64lm.data.batch import IGNORE_INDEX

__all__ = [
    "CHAT_TEMPLATE",
    "ROLES",
    "ChatFormat",
    "EncodedChat",
    "Message",
    "check_conversation",
    "check_prompt",
]

ROLES = ("system", "user", "assistant")

# v1: the system prompt joins the first user turn; an assistant turn is " " + content + </s>
# (sentencepiece encodes each message with its leading "▁", which the space reproduces).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- endif %}"
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{%- else %}{{ raise_exception('roles are system (first), user and assistant') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


def _check_turns(messages: Sequence[Message], last: str) -> None:
    if not messages:
        raise ValueError("the conversation has no messages")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"message {i} has role {m.role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m.content, str) or not m.content.strip():
            raise ValueError(f"message {i} ({m.role}) has no text")
    turns = messages[1:] if messages[0].role == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            where = "a system prompt is only allowed first" if m.role == "system" else \
                "turns must alternate user, assistant, user, ..."
            raise ValueError(f"message {i + len(messages) - len(turns)} is {m.role}, expected "
                             f"{expected}: {where}")
    if not turns or turns[-1].role != last:
        article = "an" if last == "assistant" else "a"
        raise ValueError(f"the conversation must end with {article} {last} turn")


def check_conversation(messages: Sequence[Message]) -> None:
    """Refuse (ValueError, one line) anything but [system], user, assistant, ..., assistant with
    non-blank text: a conversation half understood is never trained on."""
    _check_turns(messages, "assistant")


def check_prompt(messages: Sequence[Message]) -> None:
    """As `check_conversation`, for a prompt to be answered: it ends with a user turn."""
    _check_turns(messages, "user")


@dataclass(frozen=True)
class EncodedChat:
    tokens: list[int]  # [n] the whole conversation, as mistral-common encodes it
    trained: list[bool]  # [n] True on assistant tokens (each turn's </s> included)

    @property
    def input_ids(self) -> list[int]:
        """[n - 1]: every token but the last, which has nothing to predict."""
        return self.tokens[:-1]

    @property
    def labels(self) -> list[int]:
        """[n - 1] next-token targets aligned with `input_ids`; IGNORE_INDEX where the next token
        is not the assistant's."""
        return [t if keep else IGNORE_INDEX for t, keep in zip(self.tokens[1:], self.trained[1:])]


class ChatFormat:
    """mistral-common's v1 instruct tokenizer (the 32k model of `data.tokenizer=mistral`)."""

    def __init__(self) -> None:
        from mistral_common.protocol.instruct.messages import (
            AssistantMessage,
            SystemMessage,
            UserMessage,
        )
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        from h64lm.data.tokenizer import mistral_model_file

        # agnostic: the checks on content without "the last turn must be the user's" (serving)
        self._mistral = MistralTokenizer.from_file(str(mistral_model_file()),
                                                   mode=ValidationMode.agnostic)
        self._classes = {"system": SystemMessage, "user": UserMessage,
                         "assistant": AssistantMessage}

    @cached_property
    def bos_id(self) -> int:
        return self._mistral.instruct_tokenizer.tokenizer.bos_id

    @cached_property
    def eos_id(self) -> int:
        return self._mistral.instruct_tokenizer.tokenizer.eos_id

    def _tokens(self, messages: Sequence[Message]) -> list[int]:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        request = ChatCompletionRequest(
            messages=[self._classes[m.role](content=m.content) for m in messages])
        return self._mistral.encode_chat_completion(request).tokens

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids; control tokens (<s>, </s>) dropped."""
        return self._mistral.decode(list(ids))

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """The ids a model continues to answer the last user turn (ends with `▁[/INST]`)."""
        check_prompt(messages)
        return self._tokens(messages)

    def encode(self, messages: Sequence[Message]) -> EncodedChat:
        check_conversation(messages)
        tokens = self._tokens(messages)
        trained = [False] * len(tokens)
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            upto = self._tokens(messages[:i + 1])
            start, end = len(self._tokens(messages[:i])), len(upto)
            if upto != tokens[:end] or end <= start:
                raise ValueError(f"message {i}: mistral-common's encoding of the conversation is "
                                 "not one encoding per message; cannot mark the assistant turn")
            trained[start:end] = [True] * (end - start)
        return EncodedChat(tokens, trained)
