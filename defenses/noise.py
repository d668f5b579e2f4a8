"""Noise Injection (NI) defenses: K randomly perturbed copies of each query, scores aggregated.

Each query's randomness comes from (seed, query id), so a defense is deterministic and a query's
perturbations do not depend on which other queries are in the run. That also makes them
computable in any order: `NoiseDefense.transform` perturbs the queries of a call in a thread pool
(numpy's random draws and array arithmetic release the GIL; a 1024 px image takes ~45-90 ms per
copy on one core), and inside `shared_perturbations` a defense with the same class and parameters
reuses a query's copies instead of drawing them again (the study wraps each chunk in it, so "NI"
and "SR+NI" perturb an image once).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import string
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from probing.errors import InputError
from probing.pipeline import map_threads
from probing.query import Query
from probing.render import PromptSpec

from .base import Defense, check_int, check_rate, check_samples


def _rng(seed: int, qid: str, k: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(qid.encode()), k])


#: at most this many threads perturb one call's queries
MAX_PERTURB_THREADS = 8

_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mechprobe_ni_shared", default=None)


@contextlib.contextmanager
def shared_perturbations():
    """Within the block, NI defenses of the same class and parameters hand out the same perturbed
    copies of a query (same id, same text, same image object) instead of computing them again.
    The copies live until the block ends; the memo also holds each source image, so an image's
    ``id()`` cannot be reused by another object while it is a key."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


@dataclass
class NoiseDefense(Defense):
    category: str = "NI"
    k: int = 4
    rate: float = 0.1
    seed: int = 0

    def __post_init__(self):
        check_samples(self.k)
        check_rate("rate", self.rate)
        check_int("seed", self.seed, 0)  # numpy's generator takes no negative seed
        if self.aggregate not in ("mean", "majority"):
            raise InputError(f"parameter 'aggregate' must be 'mean' or 'majority', got {self.aggregate!r}")
        self.params = {"k": self.k, "rate": self.rate, "seed": int(self.seed), "aggregate": self.aggregate}

    def perturb(self, q: Query, rng: np.random.Generator) -> Query:
        raise NotImplementedError

    def prepare(self, q: Query):
        """What every perturbation of ``q`` starts from, computed once per query (None: nothing)."""
        return None

    def perturb_prepared(self, q: Query, state, rng: np.random.Generator) -> Query:
        """`perturb` from `prepare`'s state (image defenses: decode once, perturb K times)."""
        return self.perturb(q, rng)

    def applies(self, q: Query) -> bool:
        return True

    def _copies(self, q: Query) -> list[Query]:
        state = self.prepare(q)
        return [self.perturb_prepared(q, state, _rng(self.seed, q.id, k)) for k in range(self.k)]

    def transform(self, queries, bundle):
        memo = _SHARED.get()
        mine = (type(self), repr(sorted(self.params.items())))
        keys = [(mine, q.id, q.text, id(q.image)) for q in queries]
        todo = {}  # first index of each distinct key that needs its copies computed
        for i, (q, key) in enumerate(zip(queries, keys)):
            if self.applies(q) and (memo is None or key not in memo) and key not in todo:
                todo[key] = i
        idx = list(todo.values())
        fresh = map_threads(lambda i: self._copies(queries[i]), idx, min(os.cpu_count() or 1, MAX_PERTURB_THREADS),
                            "mechprobe-ni")
        computed = {keys[i]: (queries[i].image, copies) for i, copies in zip(idx, fresh)}
        if memo is not None:
            memo.update(computed)
        out = []
        for q, key in zip(queries, keys):
            if not self.applies(q):  # nothing to perturb: one unchanged copy
                out.append([(q, PromptSpec())])
                continue
            _, copies = computed[key] if key in computed else memo[key]
            # the copies as this query (its other fields), each its own row
            out.append([(dataclasses.replace(q, text=c.text, image=c.image), PromptSpec()) for c in copies])
        return out


@dataclass
class ImageGaussian(NoiseDefense):
    """Gaussian pixel noise with standard deviation ``rate`` (pixel values in [0, 1]).

    The image is decoded once per query; each of the K samples is computed in place on float64
    arrays with the same operations and RNG stream as ``(clip(x / 255 + N(0, rate), 0, 1) * 255)
    .round()`` (tests/test_defenses.py checks the bytes against that formula)."""

    name: str = "ni_image_gaussian"

    def applies(self, q):
        return q.has_image

    def prepare(self, q):
        return np.asarray(q.load_image(), dtype=np.float64) / 255.0

    def perturb_prepared(self, q, base, rng):
        noisy = rng.normal(0.0, self.rate, base.shape)
        noisy += base  # addition commutes bit for bit: base + noise
        np.clip(noisy, 0, 1, out=noisy)
        noisy *= 255
        np.round(noisy, out=noisy)
        return dataclasses.replace(q, image=Image.fromarray(noisy.astype(np.uint8)))

    def perturb(self, q, rng):
        return self.perturb_prepared(q, self.prepare(q), rng)


@dataclass
class ImageMask(NoiseDefense):
    """Random square patches (``patch`` px) set to grey, each with probability ``rate``.

    One uniform draw per patch in raster order (rows of patches top to bottom, left to right), as
    one vectorised draw; the image is decoded once per query."""

    name: str = "ni_image_mask"
    patch: int = 14

    def __post_init__(self):
        super().__post_init__()
        check_int("patch", self.patch, 1)
        self.params["patch"] = self.patch

    def applies(self, q):
        return q.has_image

    def prepare(self, q):
        return np.asarray(q.load_image())

    def perturb_prepared(self, q, base, rng):
        h, w = base.shape[:2]
        ny, nx = -(-h // self.patch), -(-w // self.patch)
        hit = (rng.random(ny * nx) < self.rate).reshape(ny, nx)
        arr = base.copy()
        if hit.any():
            mask = np.repeat(np.repeat(hit, self.patch, 0), self.patch, 1)[:h, :w]
            arr[mask] = 128
        return dataclasses.replace(q, image=Image.fromarray(arr))

    def perturb(self, q, rng):
        return self.perturb_prepared(q, self.prepare(q), rng)


_PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " "


@dataclass
class TextSmooth(NoiseDefense):
    """SmoothLLM-style: each character of the request replaced by a random one with probability ``rate``."""

    name: str = "ni_text_smooth"

    def applies(self, q):
        return bool(q.text)

    def perturb(self, q, rng):
        chars = list(q.text)
        swap = rng.random(len(chars)) < self.rate
        picks = rng.integers(0, len(_PRINTABLE), len(chars))
        text = "".join(_PRINTABLE[p] if s else c for c, s, p in zip(chars, swap, picks))
        return dataclasses.replace(q, text=text)


def ni_image_gaussian(k: int = 4, rate: float = 0.1, seed: int = 0, aggregate: str = "mean") -> ImageGaussian:
    return ImageGaussian(k=k, rate=rate, seed=seed, aggregate=aggregate)


def ni_image_mask(k: int = 4, rate: float = 0.1, seed: int = 0, patch: int = 14,
                  aggregate: str = "mean") -> ImageMask:
    return ImageMask(k=k, rate=rate, seed=seed, patch=patch, aggregate=aggregate)


def ni_text_smooth(k: int = 4, rate: float = 0.1, seed: int = 0, aggregate: str = "mean") -> TextSmooth:
    return TextSmooth(k=k, rate=rate, seed=seed, aggregate=aggregate)


