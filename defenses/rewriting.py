"""Query rewriting (QR) defenses: the model restates the query before it is answered.

Captioning (the image described in text), intention analysis and paraphrasing. Each generation
step runs batched and greedy with a token budget (``max_new_tokens``) through
`probing.generation.generate`, on the same model that is being defended.
"""

from __future__ import annotations

from dataclasses import dataclass

from probing.errors import InputError
from probing.generation import generate
from probing.query import Query
from probing.render import PromptSpec

from .base import Defense

CAPTION_QUESTION = "What does the image show?"
INTENT_QUESTION = "What is the essential intention of this request? {text}"
REWRITE_QUESTION = "Rewrite the following request in your own words, keeping its meaning: {text}"


def _check_budget(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"parameter 'max_new_tokens' must be an integer >= 1, got {n!r}")
    return n


@dataclass
class Caption(Defense):
    """Caption the image, then answer with the caption in the text (and the image, unless dropped)."""

    name: str = "qr_caption"
    category: str = "QR"
    keep_image: bool = True
    max_new_tokens: int = 24
    question: str = CAPTION_QUESTION

    def transform(self, queries, bundle):
        asks = [Query(q.id, self.question, q.image) for q in queries if q.has_image]
        # Paired by position, not by id: inside a composite the K noisy copies of a query share its id.
        captions = iter(generate(bundle, asks, self.max_new_tokens))
        out = []
        for q in queries:
            if not q.has_image:
                out.append([(q, PromptSpec())])
                continue
            caption = next(captions)
            text = f"The image shows: {caption}. {q.text}".strip()
            meta = {**q.meta, "caption": caption}
            out.append([(Query(q.id, text, q.image if self.keep_image else None, q.label, meta), PromptSpec())])
        return out

    def describe(self) -> dict:
        return _with_question(self, super().describe(), keep_image=self.keep_image)


def _with_question(defense, out: dict, **more) -> dict:
    """A QR defense's record with its question (and what else shapes its rewrite): a rewrite made
    with another question is another condition, and a run directory must not reuse it."""
    return {**out, "question": defense.question, **more}


@dataclass
class AskFirst(Defense):
    """Ask the model ``question`` about each request first, then build the request from its answer."""

    category: str = "QR"
    max_new_tokens: int = 24
    question: str = ""
    meta_key: str = "answer"

    def rebuild(self, q: Query, answer: str):
        raise NotImplementedError

    def transform(self, queries, bundle):
        asks = [Query(q.id, self.question.format(text=q.text), q.image) for q in queries]
        answers = generate(bundle, asks, self.max_new_tokens)
        return [[self.rebuild(Query(q.id, q.text, q.image, q.label, {**q.meta, self.meta_key: a}), a)]
                for q, a in zip(queries, answers)]

    def describe(self) -> dict:
        return _with_question(self, super().describe())


@dataclass
class Intention(AskFirst):
    """Two-stage intention analysis: state the request's essential intention, then answer with it."""

    name: str = "qr_intention"
    question: str = INTENT_QUESTION
    meta_key: str = "intention"

    def rebuild(self, q, answer):
        return q, PromptSpec(text_before=f"Intention: {answer}")


@dataclass
class Rewrite(AskFirst):
    """The model rewrites the request first; the rewrite replaces the request's text."""

    name: str = "qr_rewrite"
    max_new_tokens: int = 48
    question: str = REWRITE_QUESTION
    meta_key: str = "rewrite"

    def rebuild(self, q, answer):
        return Query(q.id, answer or q.text, q.image, q.label, q.meta), PromptSpec()


def qr_caption(max_new_tokens: int = 24) -> Caption:
    return Caption(params={"max_new_tokens": _check_budget(max_new_tokens)}, max_new_tokens=max_new_tokens)


def qr_caption_no_image(max_new_tokens: int = 24) -> Caption:
    return Caption(name="qr_caption_no_image", keep_image=False, max_new_tokens=_check_budget(max_new_tokens),
                   params={"max_new_tokens": max_new_tokens})


def qr_intention(max_new_tokens: int = 24) -> Intention:
    return Intention(params={"max_new_tokens": _check_budget(max_new_tokens)}, max_new_tokens=max_new_tokens)


def qr_rewrite(max_new_tokens: int = 48) -> Rewrite:
    return Rewrite(params={"max_new_tokens": _check_budget(max_new_tokens)}, max_new_tokens=max_new_tokens)
