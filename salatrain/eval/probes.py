"""Synthetic long-context probes (RULER-style), generated from a seed.

Every sample is a prompt of at most ``length`` tokens (answer included) whose continuation is a known answer:

    passkey            a 5-digit pass key hidden at a random depth in repeated noise sentences
    niah_multikey      4 "special magic numbers" under different keys; the question asks for one of them
    kv_retrieval       a JSON object of random 8-hex-digit keys and values; the question names one key
    variable_tracking  a chain ``VAR A = 12345. VAR B = VAR A. ...`` spread through noise; the answer lists
                       every variable that holds the value, in order

Prompts are assembled from separately tokenised pieces (token ids are concatenated, never re-tokenised), so the
length is exact up to one filler sentence, and the same ``(tokenizer, task, length, seed)`` always gives the
same samples. The answer tokens are those the tokenizer gives the question and answer written together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("passkey", "niah_multikey", "kv_retrieval", "variable_tracking")

NOISE = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)
_KEY_WORDS = (
    "amber", "basalt", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper", "kestrel",
    "lantern", "meadow", "nimbus", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "velvet",
    "willow", "zephyr",
)


@dataclass(frozen=True)
class ProbeSample:
    """One probe: feed ``prompt_ids`` and score the continuation ``answer_ids`` (the tokens of ``answer``)."""

    task: str
    length: int
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    answer: str
    depth: float  # where the (asked) needle sits in the haystack, 0 = start, 1 = end

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


class _Pieces:
    """Tokenises text pieces once each (cached); the first piece of a prompt carries the tokenizer's BOS."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}
        probe = tokenizer("x").input_ids
        plain = tokenizer("x", add_special_tokens=False).input_ids
        self.prefix = tuple(probe[: len(probe) - len(plain)]) if probe[-len(plain):] == plain else ()

    def __call__(self, text: str) -> tuple[int, ...]:
        if text not in self._cache:
            self._cache[text] = tuple(self.tok(text, add_special_tokens=False).input_ids)
        return self._cache[text]

    def question_answer(self, question: str, answer: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        q, qa = self(question), self(question + answer)
        if qa[: len(q)] == q and len(qa) > len(q):
            return q, qa[len(q):]
        return q, self(answer)


def make_samples(tokenizer, task: str, length: int, num_samples: int, seed: int = 0) -> list[ProbeSample]:
    """``num_samples`` samples of ``task`` at ``length`` tokens; deterministic in (tokenizer, task, length, seed)."""
    if task not in TASKS:
        raise ValueError(f"unknown probe task {task!r}; choose from {list(TASKS)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    pieces = _Pieces(tokenizer)
    build = _BUILDERS[task]
    out = []
    for i in range(num_samples):
        rng = random.Random(f"{seed}:{task}:{length}:{i}")
        out.append(build(pieces, rng, length))
    return out


def _haystack(pieces: _Pieces, rng: random.Random, length: int, head: str, needles: list[tuple[float, str]],
              question: str, answer: str, task: str, asked_depth: float) -> ProbeSample:
    """head + noise sentences with ``needles`` (depth, text) inserted + question; total <= length tokens."""
    q_ids, a_ids = pieces.question_answer(question, answer)
    fixed = len(pieces.prefix) + len(pieces(head)) + sum(len(pieces(" " + t)) for _, t in needles)
    fixed += len(q_ids) + len(a_ids)
    noise = [pieces(" " + s) for s in NOISE]
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"{task}: length {length} is too short (the needles and question alone take {fixed} tokens)")
    filler: list[tuple[int, ...]] = []
    used, i = 0, 0
    while used + len(noise[i % len(noise)]) <= budget:
        filler.append(noise[i % len(noise)])
        used += len(filler[-1])
        i += 1
    slots = sorted(((round(d * len(filler)), k) for k, (d, _) in enumerate(needles)))
    ids = list(pieces.prefix) + list(pieces(head))
    at = 0
    for pos, k in slots:
        for sentence in filler[at:pos]:
            ids.extend(sentence)
        ids.extend(pieces(" " + needles[k][1]))
        at = pos
    for sentence in filler[at:]:
        ids.extend(sentence)
    ids.extend(q_ids)
    return ProbeSample(task, length, tuple(ids), tuple(a_ids), answer, asked_depth)


def _passkey(pieces, rng, length):
    key = str(rng.randint(10000, 99999))
    depth = rng.random()
    head = ("There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about it.")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _haystack(pieces, rng, length, head, [(depth, needle)], "\nWhat is the pass key? The pass key is",
                     f" {key}", "passkey", depth)


def _niah_multikey(pieces, rng, length, num_needles: int = 4):
    keys = rng.sample(_KEY_WORDS, num_needles)
    values = [str(rng.randint(1000000, 9999999)) for _ in keys]
    depths = [rng.random() for _ in keys]
    asked = rng.randrange(num_needles)
    head = ("Some special magic numbers are hidden inside the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards.")
    needles = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(depths, keys, values)]
    question = (f"\nWhat is the special magic number for {keys[asked]} mentioned in the provided text? "
                f"The special magic number for {keys[asked]} mentioned in the provided text is")
    return _haystack(pieces, rng, length, head, needles, question, f" {values[asked]}", "niah_multikey",
                     depths[asked])


def _kv_retrieval(pieces, rng, length):
    head = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"
    start = len(pieces.prefix) + len(pieces(head))
    items: list[tuple[str, str, tuple[int, ...]]] = []
    used, seen = start, set()
    while True:
        k, v = f"{rng.getrandbits(32):08x}", f"{rng.getrandbits(32):08x}"
        if k in seen:
            continue
        item = pieces(f' "{k}": "{v}",')
        if used + len(item) > length:
            break
        seen.add(k)
        items.append((k, v, item))
        used += len(item)
    asked = rng.randrange(max(1, len(items)))
    while items:
        key, value, _ = items[asked]
        question = f'}}\n\nKey: "{key}"\nThe value associated with the specified key is: "'
        q_ids, a_ids = pieces.question_answer(question, value + '"')
        if start + sum(len(it[2]) for it in items) + len(q_ids) + len(a_ids) <= length:
            break
        if asked == len(items) - 1 and asked > 0:  # drop the last pair that is not the asked one
            items.pop(-2)
            asked -= 1
        else:
            items.pop()
    if not items:
        raise ValueError(f"kv_retrieval: length {length} is too short for even one key-value pair")
    ids = list(pieces.prefix) + list(pieces(head)) + [t for it in items for t in it[2]] + list(q_ids)
    return ProbeSample("kv_retrieval", length, tuple(ids), tuple(a_ids), value + '"', asked / max(1, len(items) - 1))


def _variable_tracking(pieces, rng, length, num_hops: int = 4):
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    depths = sorted(rng.random() for _ in names)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
                f"are assigned the value {value}, they are:")
    answer = " " + " ".join(names)
    return _haystack(pieces, rng, length, head, list(zip(depths, chain)), question, answer, "variable_tracking",
                     depths[0])


_BUILDERS = {
    "passkey": _passkey,
    "niah_multikey": _niah_multikey,
    "kv_retrieval": _kv_retrieval,
    "variable_tracking": _variable_tracking,
}
