"""A lexical check after the cosine match: what sentence embeddings cannot tell apart.

MiniLM puts "flights from Paris to London" and "... from London to Paris" at cosine 0.997, "Is
coffee bad for you?" and "Is coffee not bad for you?" at 0.97, and "2 eggs" vs "3 eggs" at 0.86,
inside the range of true paraphrases (0.83-0.94). A cached answer is served only when both prompts
also have the same numbers in the same order, the same negation (parity of not/no/never/n't/...),
and the same capitalised names in the same order (words after the first one of a sentence, but "I",
compared case-insensitively). What it cannot see: entities written in lower case, and antonyms.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_NEGATIONS = frozenset(
    {"not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "without", "cannot"}
)
_PRONOUNS = frozenset({"i", "i'm", "i've", "i'd", "i'll"})
_SENTENCE_END = re.compile(r"[.!?]\s+")


def signature(text: str) -> tuple[tuple[str, ...], int, tuple[str, ...]]:
    """(numbers, negation parity, names): two prompts may share an answer only if these agree."""
    text = text.replace("\u2019", "'")  # typographic apostrophes
    numbers = tuple(n.replace(",", "") for n in _NUMBER.findall(text))
    negations = 0
    names: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        for i, word in enumerate(_WORD.findall(sentence)):
            lower = word.lower()
            if lower in _NEGATIONS or lower.endswith("n't"):
                negations += 1
            elif i > 0 and word[0].isupper() and lower not in _PRONOUNS:
                names.append(lower.removesuffix("'s"))
    return numbers, negations % 2, tuple(names)


def compatible(a: str, b: str) -> bool:
    return signature(a) == signature(b)
