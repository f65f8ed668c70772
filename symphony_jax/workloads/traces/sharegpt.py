"""ShareGPT conversations (``conversations`` of ``from``/``value`` messages), for those who have it.

The file is one JSON array of conversations, each an object with a ``conversations`` list of
messages ``{"from": <role>, "value": <text>}`` (other keys, such as ``id``, are ignored).
Roles: ``human``/``user`` ask; ``gpt``/``chatgpt``/``assistant``/``bard``/``bing``/``model``
answer; ``system`` text is added to the next question. Any other role, a message that is not
an object, or a ``value`` that is not a string is an error naming the line where the
conversation starts and the field (``conversations[3].from``).

A turn is a question followed by its answer. Consecutive messages from the same side are one
message (joined by a newline). Answers before the first question answer nothing, and a last
question without an answer has no output length: neither is part of a turn. A conversation
with no complete turn yields no session; a file with no complete turn at all (``[]`` included)
is an error, as a JSON-lines or CSV trace with no record is. Session ids are positions in the array (0-based),
so they map back to the file; the workload has no arrival times (ShareGPT has none).

Token counts come from ``tokenize`` (text -> token ids; the question's ids are kept as
``Workload.token_ids``) or, without one, from the text length at ``chars_per_token`` (about 4
characters per token for English BPE vocabularies), at least 1.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from symphony_jax.workloads.session import Workload
from symphony_jax.workloads.traces._format import TraceFormatError

ASKING = frozenset({"human", "user"})
ANSWERING = frozenset({"gpt", "chatgpt", "assistant", "bard", "bing", "model"})
SYSTEM = "system"
_SPACE = re.compile(r"\s*")


def load_sharegpt(path: str | os.PathLike, *,
                  tokenize: Callable[[str], Sequence[int]] | None = None,
                  chars_per_token: float = 4.0) -> Workload:
    sessions, questions, answers = [], [], []
    for position, line, conversation in _array_items(path):
        for question, answer in _turns(path, line, conversation):
            sessions.append(position)
            questions.append(question)
            answers.append(answer)
    if not questions:
        raise TraceFormatError(path, 1, "<file>", "a conversation with a complete turn",
                               "none")
    if tokenize is None:
        count = lambda text: max(1, math.ceil(len(text) / chars_per_token))
        ids = None
    else:
        ids = tuple(tuple(int(i) for i in tokenize(q)) for q in questions)
        count = lambda text: max(1, len(tokenize(text)))
    inputs = [len(i) for i in ids] if ids is not None else [count(q) for q in questions]
    if ids is not None and min(inputs, default=1) == 0:
        empty = inputs.index(0)
        raise ValueError(f"{path}: the question of conversation {sessions[empty]} has no tokens")
    return Workload(np.asarray(sessions, np.int64), np.asarray(inputs, np.int64),
                    np.asarray([count(a) for a in answers], np.int64), token_ids=ids,
                    text=tuple(questions))


def _array_items(path) -> Iterator[tuple[int, int, object]]:
    """(position, 1-based line where it starts, value) for each element of a JSON array."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    pos = _SPACE.match(text).end()
    if not text.startswith("[", pos):
        raise TraceFormatError(path, 1 + text.count("\n", 0, pos), "<file>", "a JSON array",
                               text[pos:pos + 20])
    pos, line, counted, position = pos + 1, 1, 0, 0
    while True:
        pos = _SPACE.match(text, pos).end()
        line += text.count("\n", counted, pos)
        counted = pos
        if text.startswith("]", pos) and position == 0:
            raise TraceFormatError(path, line, "<file>", "at least one conversation",
                                   "an empty array")
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise TraceFormatError(path, e.lineno, f"[{position}]", f"a JSON value ({e.msg})",
                                   text[e.pos:e.pos + 20]) from None
        yield position, line, value
        pos = _SPACE.match(text, pos).end()
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            raise TraceFormatError(path, 1 + text.count("\n", 0, pos), f"[{position}]",
                                   "',' or ']' after an array element", text[pos:pos + 20])
        position, pos = position + 1, pos + 1
    rest = _SPACE.match(text, pos + 1).end()
    if rest != len(text):
        raise TraceFormatError(path, 1 + text.count("\n", 0, rest), "<file>",
                               "nothing after the array", text[rest:rest + 20])


def _turns(path, line: int, conversation) -> list[tuple[str, str]]:
    """The (question, answer) pairs of one conversation."""
    if not isinstance(conversation, dict) or not isinstance(
            conversation.get("conversations"), list):
        raise TraceFormatError(path, line, "conversations", "an object with a list "
                               "'conversations'", conversation)
    merged: list[list] = []  # [side, text] with consecutive same-side messages joined
    pending_system: list[str] = []
    for i, message in enumerate(conversation["conversations"]):
        if not isinstance(message, dict):
            raise TraceFormatError(path, line, f"conversations[{i}]", "an object", message)
        role, value = message.get("from"), message.get("value")
        if role not in ASKING | ANSWERING | {SYSTEM}:
            raise TraceFormatError(path, line, f"conversations[{i}].from",
                                   f"one of {sorted(ASKING | ANSWERING | {SYSTEM})}", role)
        if not isinstance(value, str):
            raise TraceFormatError(path, line, f"conversations[{i}].value", "a string", value)
        if role == SYSTEM:
            pending_system.append(value)
            continue
        side = "ask" if role in ASKING else "answer"
        if side == "ask" and pending_system:
            value, pending_system = "\n".join([*pending_system, value]), []
        if merged and merged[-1][0] == side:
            merged[-1][1] += "\n" + value
        else:
            merged.append([side, value])
    if merged and merged[0][0] == "answer":
        merged = merged[1:]
    return [(merged[k][1], merged[k + 1][1]) for k in range(0, len(merged) - 1, 2)]
