"""Chat format: ids equal mistral-common's, the loss covers assistant tokens only, HF template."""

from __future__ import annotations

import pytest

from h64lm.data.batch import IGNORE_INDEX
from h64lm.data.chat import CHAT_TEMPLATE, ChatFormat, Message, check_conversation
from h64lm.data.wiki import wiki_articles

U, A, S = "user", "assistant", "system"

CONVERSATIONS = {
    "one turn": [Message(U, "What is 2+3?"), Message(A, "5")],
    "system, three turns": [
        Message(S, "You are a terse calculator."),
        Message(U, "What is 2+3?"), Message(A, "5"),
        Message(U, "And 4+4?\nThen say hi."), Message(A, " 8, hi"),
        Message(U, "Bye "), Message(A, "Goodbye!\n\nSee you."),
    ],
    "unicode and markup": [Message(U, "Traduis « bonjour » en 日本語 [INST]?"),
                           Message(A, "こんにちは </s> — done")],
}


@pytest.fixture(scope="module")
def chat():
    return ChatFormat()


@pytest.fixture(scope="module")
def mistral():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    return MistralTokenizer.v1()


def _reference(mistral, messages):
    """encode_chat_completion of the conversation (serving mode: it must end with a user turn,
    so the reference of a conversation is built from its prefixes ending in user turns)."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    cls = {S: SystemMessage, U: UserMessage, A: AssistantMessage}
    request = ChatCompletionRequest(messages=[cls[m.role](content=m.content) for m in messages])
    return mistral.encode_chat_completion(request).tokens


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_ids_and_mask_follow_mistral_common(chat, mistral, name):
    conv = CONVERSATIONS[name]
    enc = chat.encode(conv)
    sp = mistral.instruct_tokenizer.tokenizer
    # the whole conversation: serving mode refuses a final assistant turn, so compare the prompt
    # of a follow-up question, whose encoding starts with the conversation's
    follow = _reference(mistral, conv + [Message(U, "next")])
    assert follow[:len(enc.tokens)] == enc.tokens
    assert enc.tokens[0] == sp.bos_id
    # trained tokens are exactly each assistant turn's text encoded alone, plus </s>
    answers = [m.content for m in conv if m.role == A]
    runs, run = [], []
    for tok, keep in zip(enc.tokens, enc.trained):
        if keep:
            run.append(tok)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    assert runs == [sp.encode(a, bos=False, eos=False) + [sp.eos_id] for a in answers]
    # every prompt (up to a user turn) is untrained and is mistral-common's prompt
    for i, m in enumerate(conv):
        if m.role == U:
            prompt = _reference(mistral, conv[:i + 1])
            assert enc.tokens[:len(prompt)] == prompt
            assert chat.prompt(conv[:i + 1]) == prompt
            assert not enc.trained[len(prompt) - 1]


def test_labels_are_next_tokens_of_assistant_turns_only(chat):
    enc = chat.encode(CONVERSATIONS["system, three turns"])
    ids, labels = enc.input_ids, enc.labels
    assert len(ids) == len(labels) == len(enc.tokens) - 1
    for t in range(len(ids)):
        expected = enc.tokens[t + 1] if enc.trained[t + 1] else IGNORE_INDEX
        assert labels[t] == expected
    assert sum(lab == chat.eos_id for lab in labels) == 3  # each assistant turn's closing </s>
    assert labels[-1] == chat.eos_id


def test_mistral_common_pieces_equal_our_fast_tokenizer(tokenizer, mistral):
    sp = mistral.instruct_tokenizer.tokenizer
    pieces = ["[INST] What is 2+3? [/INST]", "5", " 8, hi", "Goodbye!\n\nSee you.",
              "[INST] You are terse.\n\nHi [/INST]", "日本語 « » </s> <unk>"]
    pieces += [text[:400] for _, text in list(wiki_articles())[:20]]
    for piece in pieces:
        assert tokenizer.encode(piece) == sp.encode(piece, bos=False, eos=False), piece


@pytest.mark.parametrize("bad,reason", [
    ([Message(U, "hi")], "end with an assistant"),
    ([Message(U, "hi"), Message(A, "  ")], "no text"),
    ([Message("bot", "hi"), Message(A, "x")], "role 'bot'"),
    ([Message(A, "x")], "expected user"),
    ([Message(U, "a"), Message(U, "b"), Message(A, "c")], "alternate"),
    ([Message(U, "a"), Message(A, "b"), Message(S, "c"), Message(U, "d"), Message(A, "e")],
     "only allowed first"),
    ([], "no messages"),
])
def test_half_valid_conversations_are_refused(chat, bad, reason):
    with pytest.raises(ValueError, match=reason):
        check_conversation(bad)
    with pytest.raises(ValueError, match=reason):
        chat.encode(bad)


def test_chat_template_reproduces_mistral_common_ids(session_cache, mistral):
    """A Hugging Face tokenizer folder built as h64lm/data/tokenizer.py builds it, with
    CHAT_TEMPLATE, gives mistral-common's ids through apply_chat_template. Not for text that
    spells a control token ("</s>"): a rendered template is parsed for special tokens, while
    mistral-common encodes message text as text; no Jinja template can do both."""
    from transformers import AutoTokenizer

    from h64lm.data.tokenizer import _mistral_folder
    hf = AutoTokenizer.from_pretrained(str(_mistral_folder(session_cache)))
    hf.chat_template = CHAT_TEMPLATE
    markup = [Message(U, "Traduis « bonjour » en 日本語 [INST]?"), Message(A, "こんにちは — [/INST]")]
    for conv in (CONVERSATIONS["one turn"], CONVERSATIONS["system, three turns"], markup):
        prompt = conv + [Message(U, "One more?")]
        rows = [{"role": m.role, "content": m.content} for m in prompt]
        ids = hf.apply_chat_template(rows, tokenize=True, return_dict=True)["input_ids"]
        assert ids == _reference(mistral, prompt), conv
