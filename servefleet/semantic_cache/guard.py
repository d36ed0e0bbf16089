"""A lexical check after the cosine match: what sentence embeddings cannot tell apart.

MiniLM puts "flights from Paris to London" and "... from London to Paris" at cosine 0.997,
"Is it safe ..." and "Is it unsafe ..." at 0.99, "enable dark mode" and "disable dark mode" at
0.93, "a recipe for lasagna" and "... for vegan lasagna" at 0.87 and "2 eggs" vs "3 eggs" at 0.86,
inside the range of true paraphrases (0.62-0.99). A cached answer is served only when the two
prompts also agree on:

- numbers, in order ("two" counts as 2, "2FA" has a 2; not "one", as often a pronoun);
- negation parity (not/no/never/n't/without/..., and un-/non-/il-/dis-... in front of a word the
  other prompt has bare: "safe" vs "unsafe", "refundable" vs "non-refundable");
- names: the words written capitalised (but a sentence's first word and "I") in either prompt,
  compared case-insensitively as a multiset in both, so "Python" matches "python" and "Netflix"
  never matches "Spotify";
- contrasts: words of one group of opposites or alternatives (enable/disable, buy/sell, before/
  after, km/miles, Celsius/Fahrenheit, today/tomorrow, ...); if both prompts use the group, they
  use the same members;
- roles: the words after from/to/into/than/for/over/in/on/against/by: two words both prompts
  have did not exchange them ("from paris to london" vs "from london to paris", "tea healthier
  than coffee" vs "coffee ... than tea"), and the content words are not the same ones with two
  runs exchanged around a third ("can a dog eat cat food" vs "can a cat eat dog food");
- added constraints: when one prompt's content words are the other's plus more, none of the new
  ones is put right before a shared word ("vegan lasagna", "direct flights") or forms a phrase of
  its own after with/for/using/that/in/... ("for vegetarians", "using recursion").

Each rule is generic (word lists of English, not of the labelled sets), but they were refined while
looking at tests/data/semantic_cache_pairs_natural.jsonl, so its figures are optimistic too. What it
cannot see: a different entity written in lower case ("postgres" vs "mysql", "cat" vs "dog"), a
constraint added as a trailing adverb ("... asynchronously"), opposites outside its groups, negating
verbs ("avoid"); and it blocks paraphrases that differ in a word it checks ("World War II" vs "ww2",
"a process" vs "a running process"). Those are left to the cosine threshold.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_TOKEN = re.compile(r"[$€£%]|[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")
_SENTENCE_END = re.compile(r"[.!?:]\s+|\n")
_NUMBER = re.compile(r"\d+")
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero _ two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
    if w != "_"
} | {"thirty": "30", "forty": "40", "fifty": "50", "twice": "2"}
_NEGATIONS = frozenset("not no never none nobody nothing neither nor without cannot".split())
_NEGATING_PREFIXES = ("non-", "non", "un", "in", "im", "il", "ir", "dis")
_PRONOUNS = frozenset({"i", "i'm", "i've", "i'd", "i'll"})
# Words that carry no content for the order checks (roles, exchanged words).
_STOPWORDS = frozenset(
    """a an the my your our their his her its this that these those some any of in on at by with
    as and or is are was were be been do does did doing can could should would will shall may might
    must i me you we they he she it how what which who whom why when where whats there here to from
    into than for over get got have has had please just much many more most so if also i'm it's
    each every per using during within through around near between across via until since vs versus
    while""".split()
)
# Markers whose next content words play a role ("from X to Y", "X than Y", "substitute X for Y").
_ROLE_MARKERS = {"into": "to", "onto": "to"} | {
    m: m for m in "from to than for over in on against by".split()
}
_DETERMINERS = frozenset("a an the my your our their his her its this that these those".split())
# Words a request adds without asking for anything else ("please", "quick question", "explain").
_FILLERS = frozenset(
    """please thanks thank hi hello hey quick question want need know tell explain help really
    actually exactly like wondering anyone someone way ways method process step steps tip tips
    possible simple simply easy easiest best good idea ideas there go about kindly""".split()
)
# Words after which what follows narrows a request ("... for vegetarians", "... using recursion").
_CONSTRAINT_MARKERS = frozenset("with without for using that which who as in under by ignoring".split())

# Groups of opposites or mutually exclusive alternatives; each member is a set of synonyms.
# Multi-word members are matched on the lower-cased, space-joined words.
_CONTRASTS: tuple[tuple[frozenset[str], ...], ...] = tuple(
    tuple(frozenset(member.split("|")) for member in group.split("/"))
    for group in (
        "enable|activate|turn on|switch on/disable|deactivate|turn off|switch off",
        "increase|raise|boost|higher/decrease|reduce|lower",
        "add|insert/remove|delete",
        "install/uninstall|remove",
        "encrypt/decrypt",
        "encode/decode",
        "compress|zip/decompress|unzip|extract",
        "upload/download",
        "import/export",
        "buy|purchase|buying/sell|selling",
        "deposit/withdraw",
        "lend|lending/borrow|borrowing",
        "credit/debit",
        "open|opening/close|closed|closing",
        "start|starting/stop|stopping",
        "lock/unlock",
        "before/after",
        "gain|put on/lose",
        "win|won/lose|lost",
        "best|top/worst",
        "fastest|quickest/slowest/cheapest/easiest|simplest/hardest/safest/shortest/longest/"
        "largest|biggest/smallest/highest|tallest/lowest",
        "fast|faster|quick|quicker/slow|slower",
        "cheap|cheaper/expensive",
        "hot|warm|warm up/cold|cool|cool down",
        "high/low",
        "maximum|max/minimum",
        "ascending/descending",
        "first/second/third/fourth/fifth/last",
        "north/south",
        "east/west",
        "left/right",
        "today|tonight/tomorrow/yesterday",
        "morning/afternoon/evening/night",
        "sunrise/sunset",
        "allow|permit/block|deny|forbid",
        "accept/decline|reject",
        "public/private",
        "uppercase|upper case/lowercase|lower case",
        "read|reading/write|writing",
        "log in|login|sign in/log out|logout|sign out",
        "zoom in/zoom out",
        "check in/check out",
        "opt in/opt out",
        "show|unhide/hide",
        "expand/collapse",
        "connect/disconnect",
        "subscribe/unsubscribe",
        "upgrade/downgrade",
        "merge/split",
        "push/pull",
        "arrive|arrival|arriving/depart|departure|departing",
        "advantages|pros|benefits/disadvantages|cons|drawbacks",
        "men|male/women|female",
        "monday/tuesday/wednesday/thursday/friday/saturday/sunday",
        "january/february/march/april/june/july/august/september/october/november/december",
        "km|kilometer|kilometers|kilometre|kilometres/mile|miles/meter|meters|metre|metres/"
        "foot|feet|ft/inch|inches",
        "kg|kilogram|kilograms|kilo|kilos/lb|lbs|pound|pounds/gram|grams/ounce|ounces|oz/"
        "liter|liters|litre|litres/ml|milliliter|milliliters/gallon|gallons/cup|cups",
        "second|seconds/minute|minutes/hour|hours/day|days/week|weeks/month|months/year|years",
        "celsius/fahrenheit",
        "usd|dollar|dollars|$/eur|euro|euros|€/gbp|pound|pounds|£/yen|jpy",
    )
)


@dataclass(frozen=True)
class _Prompt:
    words: tuple[str, ...]  # lower case, possessive 's removed
    capitalised: frozenset[str]  # written with a capital inside a sentence
    numbers: tuple[str, ...]
    negations: int

    @property
    def content(self) -> tuple[str, ...]:
        return tuple(w for w in self.words if w not in _STOPWORDS and not w.isdigit())


def _parse(text: str) -> _Prompt:
    text = text.replace("\u2019", "'")  # typographic apostrophes
    words: list[str] = []
    capitalised: set[str] = set()
    numbers: list[str] = []
    negations = 0
    for sentence in _SENTENCE_END.split(text):
        for i, token in enumerate(_TOKEN.findall(sentence)):
            lower = token.lower().removesuffix("'s")
            numbers.extend(_NUMBER.findall(token))
            if lower in _NEGATIONS or lower.endswith("n't"):
                negations += 1
            elif i > 0 and token[0].isupper() and lower not in _PRONOUNS:
                capitalised.add(lower)
            numbers.extend(_NUMBER_WORDS[p] for p in lower.split("-") if p in _NUMBER_WORDS)
            words.append(lower)
    return _Prompt(tuple(words), frozenset(capitalised), tuple(numbers), negations)


def compatible(a: str, b: str) -> bool:
    """Whether the answer to prompt ``a`` may serve prompt ``b`` as far as their words tell."""
    pa, pb = _parse(a), _parse(b)
    return (
        pa.numbers == pb.numbers
        and (pa.negations + _prefixed_negations(pa, pb)) % 2
        == (pb.negations + _prefixed_negations(pb, pa)) % 2
        and _same_names(pa, pb)
        and _same_contrasts(pa, pb)
        and _same_roles(pa, pb)
        and not _exchanged(pa.content, pb.content)
        and not _adds_constraint(pa, pb)
    )


def _prefixed_negations(p: _Prompt, other: _Prompt) -> int:
    """Words of ``p`` that are a negating prefix on a word ``other`` has bare (unsafe vs safe)."""
    bare = set(other.words)
    count = 0
    for w in set(p.words) - bare:
        for prefix in _NEGATING_PREFIXES:
            stem = w[len(prefix) :]
            if w.startswith(prefix) and len(stem) >= 4 and stem in bare and w not in bare:
                count += 1
                break
    return count


def _same_names(pa: _Prompt, pb: _Prompt) -> bool:
    names = pa.capitalised | pb.capitalised
    return Counter(w for w in pa.words if w in names) == Counter(w for w in pb.words if w in names)


# word or phrase -> (group, member) of _CONTRASTS: a prompt's contrasts in one pass over its words.
def _contrast_index() -> dict[str, list[tuple[int, int]]]:
    index: dict[str, list[tuple[int, int]]] = {}
    for g, group in enumerate(_CONTRASTS):
        for m, member in enumerate(group):
            for word in member:
                index.setdefault(word, []).append((g, m))
    return index


_CONTRAST_OF = _contrast_index()
_CONTRAST_PHRASES = tuple(w for w in _CONTRAST_OF if " " in w)


def _contrasts(p: _Prompt) -> dict[int, set[int]]:
    """group -> the members of it the prompt uses."""
    joined = f" {' '.join(p.words)} "
    found: dict[int, set[int]] = {}
    for key in [*p.words, *(w for w in _CONTRAST_PHRASES if f" {w} " in joined)]:
        for group, member in _CONTRAST_OF.get(key, ()):
            found.setdefault(group, set()).add(member)
    return found


def _same_contrasts(pa: _Prompt, pb: _Prompt) -> bool:
    """Where both prompts use a group, one's members include the other's ("slow ... faster" vs
    "slow" is fine; "enable" vs "disable" is not)."""
    ca, cb = _contrasts(pa), _contrasts(pb)
    return all(ca[g] <= cb[g] or cb[g] <= ca[g] for g in ca.keys() & cb.keys())


def _phrase_after(words: tuple[str, ...], i: int) -> list[str]:
    """The content words right after ``words[i]``, determiners skipped ("from a python list")."""
    j = i + 1
    while j < len(words) and words[j] in _DETERMINERS:
        j += 1
    phrase = []
    while j < len(words) and words[j] not in _STOPWORDS:
        phrase.append(words[j])
        j += 1
    return phrase


def _roles(p: _Prompt) -> dict[str, set[str]]:
    """marker -> the content words after it."""
    roles: dict[str, set[str]] = {}
    for i, w in enumerate(p.words):
        if w in _ROLE_MARKERS:
            roles.setdefault(_ROLE_MARKERS[w], set()).update(_phrase_after(p.words, i))
    return roles


def _same_roles(pa: _Prompt, pb: _Prompt) -> bool:
    """No two words both prompts have exchanged a role ("from paris to london" vs "from london
    to paris": after "from", paris in one and london in the other, each present in both)."""
    ra, rb = _roles(pa), _roles(pb)
    wa, wb = set(pa.words), set(pb.words)
    for marker in ra.keys() & rb.keys():
        only_a, only_b = ra[marker] - rb[marker], rb[marker] - ra[marker]
        if only_a & wb and only_b & wa:
            return False
    return True


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _adds_constraint(pa: _Prompt, pb: _Prompt) -> bool:
    """One prompt is the other plus content words that narrow it: a word put right before a word
    both have ("vegan lasagna", "direct flights"), or a phrase of new words after with/for/using/
    that/... ("for vegetarians", "with a long battery life"). Other added words ("which city is
    the capital") read as rewording."""
    ca, cb = {_stem(w) for w in pa.content}, {_stem(w) for w in pb.content}
    if ca == cb or not (ca < cb or cb < ca):
        return False
    longer, shared = (pb, ca) if ca < cb else (pa, cb)
    extra = {w for w in longer.content if _stem(w) not in shared} - _FILLERS
    words = longer.words
    for i, w in enumerate(words):
        if w in extra and i + 1 < len(words) and _stem(words[i + 1]) in shared:
            return True  # a modifier put before a shared word
        if w in _CONSTRAINT_MARKERS and any(_stem(v) in shared for v in words[:i]):
            phrase = set(_phrase_after(words, i))
            if phrase & extra and phrase <= extra | _FILLERS:
                return True
    return False


def _exchanged(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """``b`` is ``a`` with two different runs of words exchanged around a third, the rest in
    place (P X M Y S vs P Y M X S, P or S not empty)."""
    if a == b or len(a) != len(b) or Counter(a) != Counter(b):
        return False
    start = 0
    while a[start] == b[start]:
        start += 1
    end = len(a)
    while a[end - 1] == b[end - 1]:
        end -= 1
    if start == 0 and end == len(a):
        return False  # all of it moved: a topic put first ("javascript let vs const, what's ...")
    ma, mb = a[start:end], b[start:end]
    n = len(ma)
    for x in range(1, n):
        for y in range(1, n - x + 1):
            middle = ma[x : n - y]  # not empty: exchanging neighbours is a mere reordering
            if middle and mb == ma[n - y :] + middle + ma[:x] and ma[:x] != ma[n - y :]:
                return True
    return False
