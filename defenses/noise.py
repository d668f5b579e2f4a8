"""Noise Injection (NI) defenses: K randomly perturbed copies of each query, scores aggregated.

Each query's randomness comes from (seed, query id), so a defense is deterministic and a query's
perturbations do not depend on which other queries are in the run.
"""

from __future__ import annotations

import dataclasses
import string
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from probing.errors import InputError
from probing.query import Query
from probing.render import PromptSpec

from .base import Defense, check_rate, check_samples


def _rng(seed: int, qid: str, k: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(qid.encode()), k])


@dataclass
class NoiseDefense(Defense):
    category: str = "NI"
    k: int = 4
    rate: float = 0.1
    seed: int = 0

    def __post_init__(self):
        check_samples(self.k)
        check_rate("rate", self.rate)
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

    def transform(self, queries, bundle):
        out = []
        for q in queries:
            if not self.applies(q):  # nothing to perturb: one unchanged copy
                out.append([(q, PromptSpec())])
                continue
            state = self.prepare(q)
            out.append([(self.perturb_prepared(q, state, _rng(self.seed, q.id, k)), PromptSpec())
                        for k in range(self.k)])
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
        if self.patch < 1:
            raise InputError(f"parameter 'patch' must be >= 1, got {self.patch}")
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


