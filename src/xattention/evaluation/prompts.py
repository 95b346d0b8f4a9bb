"""Prompts outside the task generators: calibration's sources (windows of a text, the evaluation harness's task
generators, or a built-in passkey haystack of seeded filler sentences) and the demo's needle-in-a-haystack prompt. None
needs a data package."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .data import NOISE_SENTENCE

__all__ = [
    "AUTO_TASKS",
    "NEEDLE_ANSWER_PREFIX",
    "NEEDLE_HAYSTACK",
    "NEEDLE_INSTRUCTION",
    "NEEDLE_QUESTION",
    "NEEDLE_SENTENCE",
    "TASK_SEED_OFFSET",
    "NeedlePrompt",
    "PromptSource",
    "haystack_prompt",
    "needle_prompt",
    "text_prompts",
]

logger = logging.getLogger(__name__)

_SUBJECTS = (
    "The old lighthouse keeper", "A small research team", "The river", "Our neighbour's cat", "The committee",
    "A travelling musician", "The morning train", "The city library", "An experienced pilot", "The garden",
    "A quiet student", "The weather station", "The harbour master", "A young baker", "The mountain village",
)  # fmt: skip
_VERBS = (
    "carefully examined", "slowly painted", "quietly described", "often visited", "eagerly repaired", "once measured",
    "happily collected", "patiently studied", "briefly mentioned", "secretly admired", "finally replaced",
)  # fmt: skip
_OBJECTS = (
    "the wooden bridge", "a collection of maps", "the northern coast", "an unusual recipe", "the broken clock",
    "three blue bicycles", "the annual report", "a forgotten song", "the stone wall", "a box of letters",
    "the evening sky", "a field of sunflowers", "the narrow staircase", "an ancient coin",
)  # fmt: skip
_TAILS = (
    "before the rain started", "during the long winter", "after the market closed", "while everyone else slept",
    "on a bright Tuesday morning", "without telling anyone", "for the third time that year", "near the old harbour",
    "as the bells rang at noon", "with surprising patience",
)  # fmt: skip


def _filler_sentences(rng: random.Random, count: int) -> list[str]:
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}." for _ in range(count)]


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def haystack_prompt(tokenizer: Any, length: int, *, seed: int = 0) -> list[int]:
    """A passkey retrieval prompt of exactly ``length`` tokens: seeded filler sentences, one passkey sentence at a
    seeded depth, and a question about it at the end (the built-in calibration prompt when no text is given).

    Args:
        tokenizer: anything with ``encode(text, add_special_tokens=bool) -> list[int]`` (a Hugging Face tokenizer).
        length: tokens, including the special tokens the tokenizer puts in front (e.g. BOS).
    Returns:
        token ids, ``len == length``.
    """
    rng = random.Random(seed)
    key = rng.randint(10000, 99999)
    prefix = _encode(tokenizer, "", special=True)  # what the tokenizer prepends (BOS), if anything
    question = _encode(tokenizer, "\nWhat is the pass key? The pass key is")
    body_len = length - len(prefix) - len(question)
    if body_len < 16:
        raise ValueError(f"calibration length {length} is too short for a prompt (needs > {length - body_len + 15} tokens)")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    sample = _filler_sentences(random.Random(seed + 1), 64)
    per_sentence = max(1.0, len(_encode(tokenizer, " ".join(sample))) / len(sample))
    count = int(body_len / per_sentence * 1.2) + 8
    while True:
        sentences = _filler_sentences(rng, count)
        sentences.insert(int(len(sentences) * rng.uniform(0.1, 0.7)), needle)
        body = _encode(tokenizer, " ".join(sentences))
        if len(body) >= body_len:
            break
        count *= 2
    return prefix + body[:body_len] + question


def text_prompts(tokenizer: Any, text: str, length: int, samples: int) -> list[list[int]]:
    """``samples`` windows of ``length`` tokens from ``text``, evenly spaced over it (each with the tokenizer's special
    prefix, e.g. BOS). Raises ``ValueError`` when the text is shorter than one window."""
    prefix = _encode(tokenizer, "", special=True)
    ids = _encode(tokenizer, text)
    body_len = length - len(prefix)
    if body_len <= 0:
        raise ValueError(f"calibration length {length} is too short")
    if len(ids) < body_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than the {body_len} one prompt of {length} needs")
    spare = len(ids) - body_len
    starts = [spare * i // max(1, samples - 1) for i in range(samples)] if samples > 1 else [0]
    return [prefix + ids[s : s + body_len] for s in starts]


# The evaluation harness's tasks used by tasks="auto": retrieval over essays, multi-key retrieval, variable tracking
# (chains of references), word counting over lists, and passkey over repeated filler: varied attention patterns.
AUTO_TASKS: tuple[str, ...] = ("niah_single_2", "vt", "cwe", "niah_multikey_1", "fwe", "passkey")
# Calibration samples use their own seed space so they never repeat the evaluation's prompts (its default seed is 42).
TASK_SEED_OFFSET = 1000


class PromptSource:
    """Calibration prompts: windows of ``text``, the evaluation harness's task generators, or the built-in haystack."""

    def __init__(self, tokenizer: Any, *, text: str | None, tasks: str | Sequence[str] | None, seed: int) -> None:
        self.tokenizer, self.text, self.seed = tokenizer, text, seed
        self.tasks: list[str] = []
        self.generator: Any = None
        if text is not None:
            self.kind = "text"
            return
        if tasks is None or tasks == "haystack":
            self.kind = "haystack"
            return
        auto = tasks == "auto"
        self.kind = "tasks"
        try:
            from .tasks import SampleGenerator, resolve_tasks
        except ImportError as exc:  # the evaluation harness is optional
            if not auto:
                raise ValueError(f"calibration tasks {tasks!r} need xattention.evaluation: {exc}") from exc
            logger.info("evaluation task generators unavailable (%s); using the built-in haystack", exc)
            self.kind = "haystack"
            return
        self.generator = SampleGenerator(tokenizer, base_seed=TASK_SEED_OFFSET + seed)
        if not auto:
            self.tasks = resolve_tasks(tasks)
            return
        # "auto": keep the tasks whose data packages (essays, word lists) are installed; probed on a short prompt
        for task in AUTO_TASKS:
            try:
                self.generator.generate(task, 1024, 0)
            except ImportError as exc:
                logger.info("calibration task %s skipped: %s", task, exc)
                continue
            except ValueError:  # too short for this tokenizer at 1024 tokens: the real lengths decide
                pass
            self.tasks.append(task)
        if not self.tasks:
            logger.info("no evaluation task can be generated here; using the built-in haystack")
            self.kind = "haystack"

    def prompts(self, length: int, samples: int, offset: int) -> list[tuple[str, list[int]]]:
        """``samples`` ``(label, token ids)`` of about ``length`` tokens; ``offset`` rotates the task mix per length."""
        if self.kind == "text":
            assert self.text is not None
            return [("text", ids) for ids in text_prompts(self.tokenizer, self.text, length, samples)]
        if self.kind == "tasks":
            out = []
            for i in range(samples):
                task = self.tasks[(offset + i) % len(self.tasks)]
                try:
                    sample = self.generator.generate(task, length, i)
                except ModuleNotFoundError as exc:  # a task's data package (essays, word lists) is missing
                    raise ValueError(f"calibration task {task} cannot be generated: {exc}") from exc
                out.append((task, list(sample.input_ids)))
            return out
        return [("haystack", haystack_prompt(self.tokenizer, length, seed=self.seed + 1000 * i + length)) for i in range(samples)]


# The demo's needle-in-a-haystack prompt: RULER's niah_single_1 phrasing over its "noise" haystack (Hsieh et al., 2024),
# the same five sentences repeated.
NEEDLE_HAYSTACK = NOISE_SENTENCE + " "
NEEDLE_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
NEEDLE_SENTENCE = "One of the special magic numbers is: {passkey}. "
NEEDLE_QUESTION = "\nWhat is the special magic number mentioned in the provided text?"
NEEDLE_ANSWER_PREFIX = " The special magic number mentioned in the provided text is"


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class NeedlePrompt:
    """A needle-in-a-haystack prompt: token ids ``[1, L]``, the passkey and where the needle sits."""

    input_ids: Any
    passkey: str
    depth: float
    text: str
    needle_token: int  # index of the needle's first token (from tokenising the text before it)


def needle_prompt(tokenizer: Any, length: int, *, depth: float = 0.5, seed: int = 0) -> NeedlePrompt:
    """A chat-formatted passkey prompt of about ``length`` tokens.

    The haystack is :data:`NEEDLE_HAYSTACK` repeated; the needle (a random 7-digit number from ``seed``) is inserted
    between two repetitions at fraction ``depth`` of the haystack. The user turn goes through the tokenizer's chat
    template (when it has one) and the assistant turn starts with RULER's answer prefix.

    Returns:
        :class:`NeedlePrompt` with ``input_ids`` int64 ``[1, L]``, ``L`` within one haystack repetition of ``length``.
    """
    import torch

    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    passkey = str(random.Random(seed).randint(1_000_000, 9_999_999))

    def render(repeats: int) -> str:
        pos = round(repeats * depth)
        haystack = NEEDLE_HAYSTACK * pos + NEEDLE_SENTENCE.format(passkey=passkey) + NEEDLE_HAYSTACK * (repeats - pos)
        user = NEEDLE_INSTRUCTION + haystack + NEEDLE_QUESTION
        if getattr(tokenizer, "chat_template", None):
            chat = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
        else:
            chat = user + "\n"
        return chat + NEEDLE_ANSWER_PREFIX

    overhead = len(_plain_ids(tokenizer, render(0)))
    per_repeat = max(1, len(_plain_ids(tokenizer, NEEDLE_HAYSTACK * 8)) / 8)
    if length < overhead + per_repeat:
        raise ValueError(f"--length {length} is too short: the prompt needs at least {overhead + int(per_repeat)} tokens")
    text = render(round((length - overhead) / per_repeat))
    ids = torch.tensor([_plain_ids(tokenizer, text)], dtype=torch.long)
    needle_token = len(_plain_ids(tokenizer, text[: text.index(NEEDLE_SENTENCE.format(passkey=passkey))]))
    return NeedlePrompt(ids, passkey, depth, text, needle_token)
