"""RULER-style generators and scoring: sizing, needles, determinism, templates, depth spread, scorer cases.

Every check reads the generated prompt text back independently (regular expressions, word counts) instead of trusting
the generator's own bookkeeping. The tokenizers here are tiny deterministic stand-ins (word-level and character-level);
no model or tokenizer is downloaded.
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from collections import Counter

import pytest

from xattention.evaluation import data
from xattention.evaluation.scoring import postprocess, score, string_match_all, string_match_part
from xattention.evaluation.tasks import (
    TASK_GROUPS,
    TASKS,
    SampleGenerator,
    _build_cwe,
    _fit,
    depth_for_index,
    resolve_tasks,
)

RULER_TASKS = [
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
]  # fmt: skip


class WordTokenizer:
    """Words and single punctuation marks are tokens; ids are a stable hash; ``[1]`` is BOS."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 2

    def __init__(self, vocab_size: int = 50_000) -> None:
        self.vocab_size = vocab_size
        self.pieces: dict[int, str] = {}

    def _tokens(self, text: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = []
        for tok in self._tokens(text):
            i = 3 + zlib.crc32(tok.encode()) % (self.vocab_size - 3)
            self.pieces[i] = tok
            ids.append(i)
        return ([1] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(self.pieces.get(int(i), "") for i in ids if int(i) >= 3 or not skip_special_tokens)


class CharTokenizer(WordTokenizer):
    """One token per character (no BOS)."""

    def _tokens(self, text: str) -> list[str]:
        return list(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text, add_special_tokens=False)


class ChatTokenizer(WordTokenizer):
    """A word tokenizer with a simple chat template."""

    chat_template = "<user>{content}<assistant>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert not tokenize and add_generation_prompt
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def context_of(prompt: str, start: str, end: str) -> str:
    """The text between the last ``start`` marker and the next ``end`` marker (skips in-context examples)."""
    begin = prompt.rindex(start) + len(start)
    return prompt[begin : prompt.index(end, begin)]


# ---------------------------------------------------------------------------------------------------------------------
# groups


def test_groups_and_resolution() -> None:
    assert list(TASK_GROUPS["ruler"]) == RULER_TASKS
    assert list(TASK_GROUPS["all"]) == [*RULER_TASKS, "passkey"]
    assert resolve_tasks("vt, ruler,passkey") == ["vt", *[t for t in RULER_TASKS if t != "vt"], "passkey"]
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        resolve_tasks("niah_single_1,nope")
    with pytest.raises(ValueError, match="no tasks"):
        resolve_tasks(" , ")


def test_ruler_generation_budgets() -> None:
    # RULER scripts/data/synthetic/constants.py: tokens_to_generate
    expected = {"vt": 30, "cwe": 120, "fwe": 50, **{t: 128 for t in RULER_TASKS if t.startswith("niah")}}
    assert {t: TASKS[t].max_new_tokens for t in RULER_TASKS} == expected
    assert all(TASKS[t].metric == "string_match_all" for t in TASKS)


# ---------------------------------------------------------------------------------------------------------------------
# sizing


@pytest.mark.parametrize(
    "tokenizer_cls, length, tolerance",
    # a character is a much smaller token than a word: the character-level run uses a proportionally longer target
    [(WordTokenizer, 1024, 40), (WordTokenizer, 4096, 40), (CharTokenizer, 16384, 130)],
)
def test_prompts_fill_the_target_length(tokenizer_cls, length: int, tolerance: int) -> None:
    tok = tokenizer_cls()
    gen = SampleGenerator(tok)
    for task in TASKS:
        budget = length - TASKS[task].max_new_tokens
        for index in (0, 3):
            s = gen.generate(task, length, index)
            assert s.tokens == len(tok.encode(s.prompt)), task  # the reported count is the real one
            assert budget - tolerance <= s.tokens <= budget, (task, s.tokens, budget)


def test_chat_template_is_applied_and_counted() -> None:
    tok = ChatTokenizer()
    s = SampleGenerator(tok).generate("niah_single_2", 2048, 1)
    assert s.prompt.startswith("<|user|>\nA special magic number is hidden")
    key = re.search(r"for (\S+) mentioned in the provided text\?", s.prompt).group(1)
    assert s.prompt.endswith(f"<|assistant|>\nThe special magic number for {key} mentioned in the provided text is")
    assert s.tokens == len(tok.encode(s.prompt, add_special_tokens=False)) <= 2048 - 128
    raw = SampleGenerator(tok, chat_template=False).generate("niah_single_2", 2048, 1)
    assert "<|user|>" not in raw.prompt and raw.input_ids[0] == 1  # BOS from the tokenizer
    with pytest.raises(ValueError, match="no chat template"):
        SampleGenerator(WordTokenizer(), chat_template=True)


def test_max_new_tokens_override_and_too_short() -> None:
    s = SampleGenerator(WordTokenizer(), max_new_tokens=300).generate("passkey", 1024, 0)
    assert s.max_new_tokens == 300 and 1024 - 300 - 40 <= s.tokens <= 1024 - 300
    with pytest.raises(ValueError, match="too short for vt"):
        SampleGenerator(WordTokenizer()).generate("vt", 150, 0)


def test_fit_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        steps = [rng.randint(0, 9) for _ in range(300)]
        table = [sum(steps[: n + 1]) for n in range(300)]  # nondecreasing
        lo, budget = rng.randint(0, 20), rng.randint(0, 1500)
        hint = rng.choice([None, rng.randint(0, 299)])
        fits = [n for n in range(lo, 300) if table[n] <= budget]
        tokens = table.__getitem__
        if table[lo] > budget:
            with pytest.raises(ValueError):
                _fit(tokens, budget, lo, 299, hint)
        else:
            assert _fit(tokens, budget, lo, 299, hint) == max(fits)


# ---------------------------------------------------------------------------------------------------------------------
# needles present and retrievable


NEEDLE = re.compile(r"One of the special magic (?:numbers|uuids|words) for (\S+) is: (\S+)\.")


@pytest.mark.parametrize("task", [t for t in RULER_TASKS if t.startswith("niah")])
def test_niah_answers_are_the_queried_needles(task: str) -> None:
    for index in range(3):
        s = SampleGenerator(WordTokenizer()).generate(task, 2048, index)
        found: dict[str, list[str]] = {}
        for key, value in NEEDLE.findall(s.prompt):
            found.setdefault(key, []).append(value)
        question = re.search(r"What (?:is|are all) the special magic \w+ for (.+?) mentioned in the provided text\?", s.prompt)
        queried = re.split(r", and |, ", question.group(1))
        expected = [v for k in queried for v in found[k]]
        assert sorted(s.references) == sorted(expected)
        p = TASKS[task].params
        assert len(queried) == p["num_queries"] and len(expected) == p["num_queries"] * p["num_values"]
        if p["haystack"] == "needle":
            assert len(found) > 10 and all(len(found[k]) == 1 for k in queried)  # distractors never reuse a key
        assert score(" ".join(expected), s.references) == 1.0
        assert score("", s.references) == 0.0


def test_vt_chain_resolves_to_references() -> None:
    s = SampleGenerator(WordTokenizer()).generate("vt", 2048, 5)
    text = context_of(s.prompt, "in the following text.\n\n", "\nQuestion:")
    value = re.search(r"assigned the value (\d+) in the text above", s.prompt[s.prompt.rindex("Question:") :]).group(1)
    holders = set(re.findall(rf"VAR (\w+) = {value}\b", text))
    changed = True
    while changed:
        new = {b for b, a in re.findall(r"VAR (\w+) = VAR (\w+)", text) if a in holders}
        changed = not new <= holders
        holders |= new
    assert holders == set(s.references) and len(holders) == 5
    assert "assgined the value" in s.prompt and s.prompt.count("Memorize and track") == 2  # RULER's solved example


def test_cwe_references_are_the_most_common_words() -> None:
    for length in (2048, 4096):  # RULER switches repetition counts at 4K
        s = SampleGenerator(WordTokenizer()).generate("cwe", length, 2)
        listing = context_of(s.prompt, "Memorize the ones that appear most often.\n", "\nQuestion:")
        counts = Counter(re.findall(r"\d+\. (\S+)", listing))
        ranked = counts.most_common()
        assert set(s.references) == {w for w, _ in ranked[:10]}
        assert ranked[9][1] > ranked[10][1]
        assert ranked[0][1] == (30 if length >= 4096 else 6)


class CharTokenizer(WordTokenizer):
    """Every letter and digit a token: far more tokens per list item than RULER's tokenizers."""

    def _tokens(self, text: str) -> list[str]:
        return re.findall(r"\w|[^\w\s]", text)


def test_cwe_falls_back_to_the_short_lists_when_the_long_ones_do_not_fit() -> None:
    gen = SampleGenerator(CharTokenizer())
    with pytest.raises(ValueError, match="smallest prompt"):  # the 30x lists alone overflow 4K with this tokenizer
        gen._fit_draft(_build_cwe(TASKS["cwe"].params, random.Random(0), True, 0), 3976, ("cwe", 4096))
    for length, top in ((4096, 6), (8192, 30)):
        s = gen.generate("cwe", length, 3)
        assert len(s.input_ids) <= length - s.max_new_tokens
        listing = context_of(s.prompt, "Memorize the ones that appear most often.\n", "\nQuestion:")
        ranked = Counter(re.findall(r"\d+\. (\S+)", listing)).most_common()
        assert set(s.references) == {w for w, _ in ranked[:10]} and ranked[0][1] == top
        assert SampleGenerator(CharTokenizer()).generate("cwe", length, 3).prompt == s.prompt  # deterministic


def test_fwe_references_are_the_most_frequent_coded_words() -> None:
    s = SampleGenerator(WordTokenizer()).generate("fwe", 4096, 1)
    coded = context_of(s.prompt, "Find the three most frequently appeared coded words. ", "\nQuestion:")
    counts = Counter(w for w in coded.split() if w != "...")
    ranked = counts.most_common()
    assert [w for w, _ in ranked[:3]] == s.references
    assert ranked[2][1] > ranked[3][1]
    assert coded.split().count("...") > ranked[0][1]  # the dots are the noise the question says to ignore


def test_passkey_needle() -> None:
    s = SampleGenerator(WordTokenizer()).generate("passkey", 2048, 4)
    (key,) = re.findall(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", s.prompt)
    assert s.references == [key] and s.prompt.endswith("What is the pass key? The pass key is")


# ---------------------------------------------------------------------------------------------------------------------
# determinism, templates, depths


@pytest.mark.parametrize("task", list(TASKS))
def test_deterministic_per_seed_and_different_across_seeds(task: str) -> None:
    a = SampleGenerator(WordTokenizer()).generate(task, 2048, 1)
    b = SampleGenerator(WordTokenizer()).generate(task, 2048, 1)
    assert (a.prompt, a.references, a.seed) == (b.prompt, b.references, b.seed)
    other_index = SampleGenerator(WordTokenizer()).generate(task, 2048, 2)
    other_seed = SampleGenerator(WordTokenizer(), base_seed=7).generate(task, 2048, 1)
    assert other_index.prompt != a.prompt and other_seed.prompt != a.prompt
    assert other_index.seed != a.seed != other_seed.seed


def test_global_random_state_is_untouched() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    SampleGenerator(WordTokenizer()).generate("niah_multikey_2", 2048, 0)
    assert random.random() == expected


TEMPLATES = {
    # RULER constants.py templates and answer prefixes, with its singular rewording for one value
    "niah_single_1": ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz "
                      "you about the number afterwards.\n", "What is the special magic number for {q} mentioned in the "
                      "provided text? The special magic number for {q} mentioned in the provided text is"),
    "niah_single_3": ("A special magic uuid is hidden", "The special magic uuid for {q} mentioned in the provided text is"),
    "niah_multivalue": ("Some special magic numbers are hidden within the following text.",
                        "What are all the special magic numbers for {q} mentioned in the provided text? The special "
                        "magic numbers for {q} mentioned in the provided text are"),
    "niah_multiquery": ("Some special magic numbers are hidden", "The special magic numbers for {q} mentioned in the "
                        "provided text are"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
           "Question: Find all variables that are assigned the value {v} in the text above. Answer: According to the "
           "chain(s) of variable assignment in the text above, 5 variables are assgined the value {v}, they are:"),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            "that appear most often.\n", "\nQuestion: What are the 10 most common words in the above list? Answer: The "
            "top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
            "appeared coded words. ", "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What "
            "are the three most frequently appeared words in the above coded text? Answer: According to the coded text "
            "above, the three most frequently appeared words are:"),
}  # fmt: skip


@pytest.mark.parametrize("task", list(TEMPLATES))
def test_templates(task: str) -> None:
    s = SampleGenerator(WordTokenizer()).generate(task, 2048, 0)
    head, tail = TEMPLATES[task]
    q = re.search(r" for (.+?) mentioned in the provided text\?", s.prompt)
    v = re.search(r"assigned the value (\d+) in the text above\. Answer", s.prompt[-300:])
    tail = tail.format(q=q.group(1) if q else "", v=v.group(1) if v else "")
    assert s.prompt.startswith(head) and s.prompt.endswith(tail)
    if task == "niah_multiquery":
        assert q.group(1).count(", ") == 3 and ", and " in q.group(1)


def test_depths_spread_evenly() -> None:
    n = 8
    assert sorted(depth_for_index(i) for i in range(n)) == [k / n for k in range(n)]
    gen = SampleGenerator(WordTokenizer())
    for index in range(n):
        s = gen.generate("niah_single_1", 4096, index)
        lines = context_of(s.prompt, "afterwards.\n", "\nWhat is").split("\n")
        (pos,) = [i for i, line in enumerate(lines) if line.startswith("One of the special magic")]
        assert abs(pos / (len(lines) - 1) - depth_for_index(index)) <= 1.5 / len(lines)
    # several needles: evenly spaced around the context
    s = gen.generate("niah_multivalue", 4096, 1)
    body = context_of(s.prompt, "afterwards.\n", "\nWhat are all")
    starts = [m.start() / len(body) for m in NEEDLE.finditer(body)]
    assert len(starts) == 4
    assert all(abs((b - a) - 0.25) < 0.03 for a, b in itertools.pairwise(starts))


def test_essays_and_word_lists_come_from_the_packages() -> None:
    words = data.essay_words()
    assert len(words) > 100_000
    assert "hard liquor, cigarettes, heroin, and crack" in data.essay_text()  # addiction.txt, the first essay
    assert len(data.nouns()) > 6000 and len(data.adjectives()) > 900 and len(data.verbs()) > 1000
    assert set(data.word_pool()) == set(data.nouns()) | set(data.adjectives()) | set(data.verbs())
    sents = data.split_sentences('One. Two? "Three!" Four')
    assert sents == ["One.", "Two?", '"Three!"', "Four"]


# ---------------------------------------------------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize(
    "prediction, references, all_score, part_score",
    [
        ("The special magic number is 1234567.", ["1234567"], 1.0, 1.0),
        ("  1234567 and 7654321\n", ["1234567", "7654321"], 1.0, 1.0),
        ("only 1234567", ["1234567", "7654321"], 0.5, 1.0),
        ("nothing here", ["1234567", "7654321"], 0.0, 0.0),
        ("APPLE, Banana", ["apple", "banana", "cherry", "date"], 0.5, 1.0),
        ("123456", ["1234567"], 0.0, 0.0),  # a reference must appear whole
    ],
)
def test_scorers(prediction: str, references: list[str], all_score: float, part_score: float) -> None:
    assert string_match_all(prediction, references) == all_score
    assert string_match_part(prediction, references) == part_score
    assert score(prediction, references) == all_score
    assert score(prediction, references, "string_match_part") == part_score


def test_scorer_errors_and_postprocess() -> None:
    assert postprocess("\x00 abc\x07def \t") == "abc\ndef"
    with pytest.raises(ValueError, match="at least one reference"):
        string_match_all("x", [])
    with pytest.raises(ValueError, match="unknown metric"):
        score("x", ["x"], "bleu")
