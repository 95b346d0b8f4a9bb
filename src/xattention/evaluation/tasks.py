"""RULER-style synthetic tasks: seeded, deterministic prompt generators sized to a target token length.

Task definitions, templates, answer prefixes and generation budgets follow RULER (Hsieh et al., 2024, arXiv:2404.06654,
``scripts/synthetic.yaml`` and ``scripts/data/synthetic/constants.py``); passkey follows Mohtashami & Jaggi (2023,
arXiv:2305.16300). Differences from RULER, each for a reason:

* Needle depths are not drawn at random: sample ``i`` puts its first needle at depth ``d_i`` (the base-2 van der Corput
  sequence 0, 1/2, 1/4, 3/4, ...) and spreads the others evenly, ``(d_i + j/m) mod 1`` for ``m`` needles, so any number
  of samples covers the context evenly and a sample's prompt does not depend on how many samples are asked for.
* Every random draw comes from one ``random.Random`` seeded per (base seed, task, length, sample index); no global state.
* The token budget is measured on the exact text the model sees (chat template and answer prefix included) with the
  evaluated model's own tokenizer: ``prompt tokens + max_new_tokens <= length``, found by a galloping/binary search on
  the haystack size (RULER sizes once per task and subtracts a guessed template overhead).
* The essay haystack is split into sentences with a regular expression rather than nltk.
* RULER's two QA tasks (qa_1 SQuAD, qa_2 HotpotQA) need dataset downloads and are left out: "ruler" is its 11 synthetic
  tasks; "all" adds passkey.
"""

from __future__ import annotations

import hashlib
import logging
import random
import string
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from . import data

__all__ = [
    "TASKS",
    "TASK_GROUPS",
    "PromptFormatter",
    "Sample",
    "SampleGenerator",
    "Task",
    "depth_for_index",
    "resolve_tasks",
    "sample_seed",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One task: its generator kind, RULER's parameters, the generation budget and the metric."""

    name: str
    kind: str  # "niah" | "vt" | "cwe" | "fwe" | "passkey"
    max_new_tokens: int
    params: Mapping[str, Any] = field(default_factory=dict)
    metric: str = "string_match_all"


def _niah(name: str, haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> Task:
    params = {"haystack": haystack, "type_key": key, "type_value": value, "num_keys": k, "num_values": v, "num_queries": q}
    return Task(name, "niah", 128, MappingProxyType(params))


# RULER scripts/synthetic.yaml; tokens_to_generate from scripts/data/synthetic/constants.py.
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _niah("niah_single_1", "noise", "words", "numbers"),
        _niah("niah_single_2", "essay", "words", "numbers"),
        _niah("niah_single_3", "essay", "words", "uuids"),
        _niah("niah_multikey_1", "essay", "words", "numbers", k=4),
        _niah("niah_multikey_2", "needle", "words", "numbers"),
        _niah("niah_multikey_3", "needle", "uuids", "uuids"),
        _niah("niah_multivalue", "essay", "words", "numbers", v=4),
        _niah("niah_multiquery", "essay", "words", "numbers", q=4),
        Task("vt", "vt", 30, MappingProxyType({"num_chains": 1, "num_hops": 4})),
        Task("cwe", "cwe", 120, MappingProxyType({"freq_cw": 30, "freq_ucw": 3, "num_cw": 10})),
        Task("fwe", "fwe", 50, MappingProxyType({"alpha": 2.0, "coded_wordlen": 6})),
        Task("passkey", "passkey", 16, MappingProxyType({})),
    )
}

_RULER = tuple(name for name in TASKS if name != "passkey")
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "ruler": _RULER,
    "niah": tuple(name for name in _RULER if name.startswith("niah")),
    "all": (*_RULER, "passkey"),
}


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """Expand ``"ruler"``, ``"niah"``, ``"all"`` and comma-separated task names into a deduplicated, ordered list.

    Raises ``ValueError`` naming an unknown task and listing the known tasks and groups.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        names = TASK_GROUPS.get(item, (item,))
        for name in names:
            if name not in TASKS:
                raise ValueError(f"unknown task {item!r}; known tasks: {', '.join(TASKS)}; groups: {', '.join(TASK_GROUPS)}")
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("no tasks given")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# templates (RULER scripts/data/synthetic/constants.py; the answer prefix is where the model's answer starts)

NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# "assgined" is RULER's spelling; kept so prompts match the benchmark's.
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assgined the value "
    "{query}, they are: "
)

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear "
    "most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared "
    "coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
    "most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_TEMPLATE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n{context}\n\nWhat is the pass key?"
)
PASSKEY_ANSWER_PREFIX = " The pass key is"


def _singular(text: str) -> str:
    """RULER's rewording of the NIAH template when exactly one value is asked for (applied before formatting)."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


# ---------------------------------------------------------------------------------------------------------------------
# seeds, depths, random values


def sample_seed(base_seed: int, task: str, length: int, index: int) -> int:
    """A stable 63-bit seed for one sample (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(f"{base_seed}:{task}:{length}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def depth_for_index(index: int) -> float:
    """Relative depth in ``[0, 1)`` of sample ``index``'s first needle: the base-2 van der Corput sequence.

    0, 1/2, 1/4, 3/4, 1/8, 5/8, ...: every prefix of ``n`` samples is spread evenly across the context.
    """
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    depth, denom = 0.0, 1.0
    while index:
        denom *= 2.0
        index, bit = divmod(index, 2)
        depth += bit / denom
    return depth


def _spread(first: float, count: int) -> list[float]:
    """``count`` depths evenly spaced around ``[0, 1)`` starting at ``first``, sorted."""
    return sorted((first + j / count) % 1.0 for j in range(count))


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":  # RULER: 7-digit numbers
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":  # RULER: a random "adjective-noun" pair
        adjs, nouns = data.adjectives(), data.nouns()
        return f"{adjs[rng.randrange(len(adjs))]}-{nouns[rng.randrange(len(nouns))]}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _insert(units: Sequence[str], items: Sequence[str], depths: Sequence[float]) -> list[str]:
    """Place ``items[j]`` before unit ``int(depths[j] * len(units))`` (depths sorted ascending)."""
    out: list[str] = []
    cuts = [min(int(d * len(units)), len(units)) for d in depths]
    start = 0
    for item, cut in zip(items, cuts, strict=True):
        out.extend(units[start:cut])
        out.append(item)
        start = cut
    out.extend(units[start:])
    return out


def _essay_prefix(num_words: int) -> str:
    """The first ``num_words`` words of the essays, repeating them when more are asked for (as RULER does)."""
    words = data.essay_words()
    if num_words <= len(words):
        return " ".join(words[:num_words])
    reps = -(-num_words // len(words))
    return " ".join((list(words) * reps)[:num_words])


# ---------------------------------------------------------------------------------------------------------------------
# task builders: each returns a _Draft whose render(size) gives (body, answer_prefix) for a haystack of `size` units


@dataclass
class _Draft:
    render: Callable[[int], tuple[str, str]]
    references: list[str]
    min_size: int = 0
    max_size: int | None = None
    depth: float | None = None


def _build_niah(p: Mapping[str, Any], rng: random.Random, depth: float, seed: int) -> _Draft:
    num_k = max(p["num_keys"], p["num_queries"])  # RULER: num_needle_k = max(num_needle_k, num_needle_q)
    num_v, num_q, type_k, type_v = p["num_values"], p["num_queries"], p["type_key"], p["type_value"]
    keys: list[str] = []
    while len(keys) < num_k:  # distinct keys: a repeated key would make the question ambiguous
        key = _random_value(rng, type_k)
        if key not in keys:
            keys.append(key)
    values = [[_random_value(rng, type_v) for _ in range(num_v)] for _ in keys]
    needles = [NIAH_NEEDLE.format(type_needle_v=type_v, key=k, value=v) for k, vs in zip(keys, values, strict=True) for v in vs]
    rng.shuffle(needles)
    queried = rng.sample(range(num_k), num_q)
    queries = [keys[i] for i in queried]
    answers = [v for i in queried for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, shown_type = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, type_v
    if num_q * num_v == 1:
        template, prefix, shown_type = _singular(template), _singular(prefix), type_v[:-1]
    depths = _spread(depth, len(needles))

    distractors: list[str] = []
    distractor_rng = random.Random(seed ^ 0x5EED)  # its own stream, so the first n distractors never change with n

    def haystack_units(size: int) -> tuple[list[str], str]:
        if p["haystack"] == "noise":
            return [data.NOISE_SENTENCE] * size, "\n"
        if p["haystack"] == "needle":
            while len(distractors) < size:
                key = _random_value(distractor_rng, type_k)
                if key in keys:  # a distractor must never answer the question
                    continue
                value = _random_value(distractor_rng, type_v)
                distractors.append(NIAH_NEEDLE.format(type_needle_v=type_v, key=key, value=value))
            return distractors[:size], "\n"
        return data.split_sentences(_essay_prefix(size)), " "

    def render(size: int) -> tuple[str, str]:
        units, sep = haystack_units(size)
        context = sep.join(_insert(units, needles, depths))
        body = template.format(type_needle_v=shown_type, context=context, query=query)
        return body, prefix.format(type_needle_v=shown_type, query=query)

    return _Draft(render, answers, depth=depth)


def _vt_chain(rng: random.Random, num_hops: int, name_len: int) -> tuple[list[str], list[str], str]:
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(num_hops)]
    return names, chain, value


def _vt_text(chain: Sequence[str], value: str, num_noise: int, depth: float, num_v: int) -> tuple[str, str]:
    # chain statements keep their order: the sorted depths are assigned in chain order
    context = "\n".join(_insert([data.NOISE_SENTENCE] * num_noise, chain, _spread(depth, len(chain))))
    return VT_TEMPLATE.format(context=context, query=value), VT_ANSWER_PREFIX.format(num_v=num_v, query=value)


def _build_vt(p: Mapping[str, Any], rng: random.Random, depth: float, icl_noise: int) -> _Draft:
    num_hops, num_chains = p["num_hops"], p["num_chains"]
    if num_chains != 1:
        raise ValueError("vt supports num_chains=1 (RULER's setting)")
    # RULER prefixes one solved example with 3-letter names (its ICL example)
    icl_names, icl_chain, icl_value = _vt_chain(rng, num_hops, 3)
    icl_body, icl_prefix = _vt_text(icl_chain, icl_value, icl_noise, rng.random(), num_hops + 1)
    icl = f"{icl_body}{icl_prefix.rstrip()} {' '.join(icl_names)}\n"
    names, chain, value = _vt_chain(rng, num_hops, 5)

    def render(size: int) -> tuple[str, str]:
        body, prefix = _vt_text(chain, value, size, depth, num_hops + 1)
        return icl + body, prefix

    return _Draft(render, names, depth=depth)


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe_list(words: Sequence[str], num_cw: int, freq_cw: int, freq_ucw: int, shuffle_seed: int) -> tuple[str, list[str]]:
    common, uncommon = list(words[:num_cw]), list(words[num_cw:])
    items = common * freq_cw + uncommon * freq_ucw
    random.Random(shuffle_seed).shuffle(items)
    return _numbered(items), common


def _build_cwe(p: Mapping[str, Any], rng: random.Random, long_lists: bool, seed: int) -> _Draft:
    """RULER's lists: below 4K tokens 6x/1x (example 20 words, 3x/1x); from 4K on 30x/3x (example 40 words, 10x/3x)."""
    num_cw = p["num_cw"]
    if not long_lists:
        freq_cw, freq_ucw, ex_words, ex_cw, ex_ucw = 6, 1, 20, 3, 1
    else:
        freq_cw, freq_ucw, ex_words, ex_cw, ex_ucw = p["freq_cw"], p["freq_ucw"], 40, 10, 3
    pool = data.word_pool()
    example_ctx, example_answer = _cwe_list(rng.sample(pool, ex_words), num_cw, ex_cw, ex_ucw, seed + 1)
    example = f"{CWE_TEMPLATE.format(context=example_ctx)}{CWE_ANSWER_PREFIX} {_numbered(example_answer)}\n"
    order = rng.sample(pool, len(pool))
    references = order[:num_cw]

    def render(size: int) -> tuple[str, str]:
        context, _ = _cwe_list(order[:size], num_cw, freq_cw, freq_ucw, seed)
        return example + CWE_TEMPLATE.format(context=context), CWE_ANSWER_PREFIX

    return _Draft(render, references, min_size=num_cw, max_size=len(pool))


def _zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta for alpha > 1: partial sum plus the Euler-Maclaurin tail (error ~ terms**-(alpha+1))."""
    n = float(terms)
    return sum(k**-alpha for k in range(1, terms + 1)) + n ** (1 - alpha) / (alpha - 1) - 0.5 * n**-alpha


def _build_fwe(p: Mapping[str, Any], rng: random.Random, length: int, seed: int) -> _Draft:
    alpha, wordlen = float(p["alpha"]), int(p["coded_wordlen"])
    vocab_size = max(length // 50, 8)  # RULER: max_seq_length // 50
    vocab_set: set[str] = set()
    while len(vocab_set) < vocab_size:
        vocab_set.add("".join(rng.choices(string.ascii_lowercase, k=wordlen)))
    vocab = sorted(vocab_set)
    rng.shuffle(vocab)
    vocab[0] = "..."  # RULER: the most frequent "word" is noise the question says to ignore
    zeta = _zeta(alpha)

    def render(size: int) -> tuple[str, str]:
        words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(size * k**-alpha / zeta))]
        random.Random(seed).shuffle(words)
        return FWE_TEMPLATE.format(context=" ".join(words)), FWE_ANSWER_PREFIX

    return _Draft(render, vocab[1:4], min_size=int(16 * zeta) + 1)  # >= 16 copies of "...": ranks 2-4 all appear


def _build_passkey(rng: random.Random, depth: float) -> _Draft:
    key = str(rng.randint(10000, 99999))
    needle = PASSKEY_NEEDLE.format(key=key)

    def render(size: int) -> tuple[str, str]:
        context = " ".join(_insert([data.NOISE_SENTENCE] * size, [needle], [depth]))
        return PASSKEY_TEMPLATE.format(context=context), PASSKEY_ANSWER_PREFIX

    return _Draft(render, [key], depth=depth)


# ---------------------------------------------------------------------------------------------------------------------
# prompt formatting and sizing


class PromptFormatter:
    """Turns a task's (body, answer prefix) into the exact text and token ids the model sees.

    With a chat template (``tokenizer.chat_template`` set, or ``chat_template=True``): the body is the user message,
    the generation prompt follows and the answer prefix starts the assistant's turn (as RULER places it after the model
    template); token ids come from ``encode(text, add_special_tokens=False)`` because the template writes its own special
    tokens. Without one (a base model): ``body + answer_prefix``, encoded with the tokenizer's special tokens (BOS).

    The tokenizer needs ``encode(text, add_special_tokens=...) -> list[int]`` and, for chat, ``apply_chat_template``.
    """

    def __init__(self, tokenizer: Any, chat_template: bool | None = None) -> None:
        has_template = bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")
        if chat_template and not has_template:
            raise ValueError("the tokenizer has no chat template; run without --chat-template")
        self.tokenizer = tokenizer
        self.chat = has_template if chat_template is None else bool(chat_template)

    def format(self, body: str, answer_prefix: str) -> str:
        if self.chat:
            head = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
            )
            text = head + answer_prefix.lstrip()
        else:
            text = body + answer_prefix
        # a trailing space would be its own token in BPE vocabularies and push the model off its usual path
        return text.rstrip(" ")

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=not self.chat)]


@dataclass
class Sample:
    """One generated prompt.

    Attributes:
        prompt: the exact text the model sees (chat template and answer prefix applied).
        input_ids: ``prompt`` tokenized, ``len(input_ids) + max_new_tokens <= length``.
        references: the strings a correct answer contains (scored with ``metric``).
        size: haystack units used (noise lines, essay words, distractors, list words, coded words).
        depth: relative depth of the first needle (NIAH, vt, passkey), else ``None``.
    """

    task: str
    length: int
    index: int
    seed: int
    prompt: str
    input_ids: list[int]
    references: list[str]
    max_new_tokens: int
    metric: str
    size: int
    depth: float | None = None

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


class SampleGenerator:
    """Builds :class:`Sample` s for (task, length, index), sized with the evaluated model's tokenizer.

    Args:
        tokenizer: the model's tokenizer (see :class:`PromptFormatter` for what it must offer).
        chat_template: ``None`` uses the tokenizer's chat template when it has one; ``False`` forces raw prompts.
        base_seed: mixed with (task, length, index) into each sample's seed (default 42, RULER's).
        max_new_tokens: overrides every task's generation budget (default: RULER's per task).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        chat_template: bool | None = None,
        base_seed: int = 42,
        max_new_tokens: int | None = None,
    ) -> None:
        if max_new_tokens is not None and max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.formatter = PromptFormatter(tokenizer, chat_template)
        self.base_seed = int(base_seed)
        self.max_new_tokens = max_new_tokens
        self._hints: dict[tuple[str, int], int] = {}
        self._icl_noise: dict[int, int] = {}
        self._fallbacks_logged: set[tuple[str, int]] = set()

    def budget(self, task: str, length: int) -> int:
        """Prompt tokens allowed: ``length - max_new_tokens``."""
        return length - self.new_tokens(task)

    def new_tokens(self, task: str) -> int:
        return self.max_new_tokens if self.max_new_tokens is not None else TASKS[task].max_new_tokens

    def generate(self, task: str, length: int, index: int) -> Sample:
        """Generate sample ``index`` of ``task`` at ``length`` tokens (deterministic in all arguments and the seed)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        spec = TASKS[task]
        budget = self.budget(task, length)
        if budget <= 0:
            raise ValueError(f"length {length} leaves no room for {task}'s {self.new_tokens(task)} answer tokens")
        seed = sample_seed(self.base_seed, task, length, index)
        rng = random.Random(seed)
        depth = depth_for_index(index)
        fallback: Callable[[], _Draft] | None = None  # a draft to try when ``draft`` does not fit even at its smallest
        if spec.kind == "niah":
            draft = _build_niah(spec.params, rng, depth, seed)
        elif spec.kind == "vt":
            draft = _build_vt(spec.params, rng, depth, self._vt_icl_noise(length))
        elif spec.kind == "cwe":
            draft = _build_cwe(spec.params, rng, length >= 4096, seed)
            if length >= 4096:
                # A tokenizer that spends more tokens per list item than RULER's (digits one by one, or transformers
                # 5.17's broken Gemma tokenizer) may not fit the 30x lists near 4K: then RULER's below-4K lists.
                fallback = lambda: _build_cwe(spec.params, random.Random(seed), False, seed)
        elif spec.kind == "fwe":
            draft = _build_fwe(spec.params, rng, length, seed)
        elif spec.kind == "passkey":
            draft = _build_passkey(rng, depth)
        else:  # pragma: no cover - TASKS only holds the kinds above
            raise ValueError(f"unknown task kind {spec.kind!r}")

        while True:
            try:
                size, tokens, cache = self._fit_draft(draft, budget, (task, length))
                break
            except ValueError as exc:
                if fallback is None:
                    raise ValueError(f"length {length} is too short for {task}: {exc}") from None
                if (task, length) not in self._fallbacks_logged:
                    logger.warning("%s at %d: %s; falling back to RULER's shorter setting for such samples", task, length, exc)
                    self._fallbacks_logged.add((task, length))
                draft, fallback = fallback(), None
        self._hints[(task, length)] = size
        if draft.max_size is not None and size == draft.max_size and tokens(size) < budget:
            logger.warning("%s at %d: haystack exhausted at %d of %d prompt tokens", task, length, tokens(size), budget)
        text, ids = cache[size]
        return Sample(
            task=task,
            length=length,
            index=index,
            seed=seed,
            prompt=text,
            input_ids=ids,
            references=list(draft.references),
            max_new_tokens=self.new_tokens(task),
            metric=spec.metric,
            size=size,
            depth=draft.depth,
        )

    def _fit_draft(
        self, draft: _Draft, budget: int, key: tuple[str, int]
    ) -> tuple[int, Callable[[int], int], dict[int, tuple[str, list[int]]]]:
        """The largest haystack size of ``draft`` within ``budget`` tokens, its token counter and the rendered cache."""
        cache: dict[int, tuple[str, list[int]]] = {}

        def tokens(size: int) -> int:
            if size not in cache:
                text = self.formatter.format(*draft.render(size))
                cache[size] = (text, self.formatter.encode(text))
            return len(cache[size][1])

        return _fit(tokens, budget, draft.min_size, draft.max_size, self._hints.get(key)), tokens, cache

    def _vt_icl_noise(self, length: int) -> int:
        """Noise lines of vt's solved example: RULER fits it in 500 tokens; we also cap it at a quarter of the length."""
        if length not in self._icl_noise:
            budget = min(500, length // 4)
            names, chain, value = _vt_chain(random.Random(0), 4, 3)

            def tokens(size: int) -> int:
                body, prefix = _vt_text(chain, value, size, 0.0, len(chain))
                return len(self.formatter.tokenizer.encode(f"{body}{prefix.rstrip()} {' '.join(names)}\n"))

            try:
                self._icl_noise[length] = _fit(tokens, budget, 0, None, None)
            except ValueError:
                self._icl_noise[length] = 0
        return self._icl_noise[length]


def _fit(tokens: Callable[[int], int], budget: int, lo: int, hi: int | None, hint: int | None) -> int:
    """Largest ``n`` in ``[lo, hi]`` with ``tokens(n) <= budget``, for ``tokens`` nondecreasing in ``n``.

    Gallops from ``hint`` (the size that fitted the previous sample, usually within a few units) or from an estimate of
    tokens per unit, then bisects. Raises ``ValueError`` if even ``lo`` does not fit.
    """
    base = tokens(lo)
    if base > budget:
        raise ValueError(f"the smallest prompt has {base} tokens, more than the {budget} available")
    if hint is None:
        probe = max(lo + 1, 2 * lo, 8)
        if hi is not None:
            probe = min(probe, hi)
        per_unit = max((tokens(probe) - base) / max(probe - lo, 1), 1e-6)
        hint = lo + int((budget - base) / per_unit)
    n = max(lo, hint if hi is None else min(hint, hi))
    step = max(1, n // 64)
    if tokens(n) <= budget:
        good, bad = n, None
        while bad is None:
            if hi is not None and good >= hi:
                return hi
            m = good + step if hi is None else min(good + step, hi)
            if tokens(m) <= budget:
                good, step = m, step * 2
            else:
                bad = m
    else:
        good, bad = None, n
        while good is None:
            m = max(lo, bad - step)
            if tokens(m) <= budget:
                good = m
            else:
                bad, step = m, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if tokens(mid) <= budget:
            good = mid
        else:
            bad = mid
    return good
