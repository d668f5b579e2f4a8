"""The unit of work: one labelled request, optionally with an image."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError, QueryError

LABELS = ("harmful", "benign")

#: The metadata key naming the request a query delivers. A dataset that holds one request several
#: ways under different ids (MM-SafetyBench's SD / TYPO / SD_TYPO / TEXT of one question, the toy's
#: text / typography / picture of one phrase) gives them one ``meta["group"]``, so that cross-fitting
#: (`probing.analysis.folds`) never fits on one delivery and evaluates on another. A query without a
#: group is a group of its own (its id). A string or an integer; ScoreTable rows keep it.
GROUP = "group"

#: Largest image (width x height) `Query.load_image` decodes: a small file can declare a huge
#: image (a "decompression bomb") whose decoding would exhaust memory. Override per call with
#: ``load_image(max_pixels=...)`` or for a process with the environment variable below.
MAX_IMAGE_PIXELS = 50_000_000
MAX_PIXELS_ENV = "MECHPROBE_MAX_IMAGE_PIXELS"

__all__ = ["GROUP", "LABELS", "MAX_IMAGE_PIXELS", "Query", "QueryError", "check_images", "check_unique_ids", "max_image_pixels"]


@dataclass(frozen=True)
class Query:
    """One request to score (immutable: make variants with ``dataclasses.replace``).

    Attributes:
        id: unique identifier, used to pair runs of the same query under different defenses.
        text: the user's request (may be empty when an image carries it).
        image: None, a PIL image, or a path to an image file.
        label: "harmful", "benign", or None when unknown.
        meta: free-form metadata (scenario, kind, source, ...); ``meta["group"]`` (`GROUP`), if
            present, names the request this query delivers (a string or an integer).
    """

    id: str
    text: str = ""
    image: Image.Image | str | os.PathLike | None = None
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # frozen: normalise through object.__setattr__, once, at construction
        object.__setattr__(self, "id", _check_id(self.id))
        object.__setattr__(self, "text", _check_text(self.id, self.text))
        _check_image_field(self.id, self.image)
        if not isinstance(self.meta, dict):
            raise QueryError(f"query {self.id!r}: meta must be a dict, got {type(self.meta).__name__}")
        _check_group(self.id, self.meta.get(GROUP))
        if not self.text.strip() and self.image is None:
            raise QueryError(f"query {self.id!r} has neither text nor image")
        if self.label is not None and self.label not in LABELS:
            raise QueryError(f"query {self.id!r}: label must be one of {LABELS} or None, got {self.label!r}")

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def load_image(self, max_pixels: int | None = None) -> Image.Image | None:
        """The image as an 8-bit RGB PIL image, or None for a text-only query.

        Transparent pixels are composited onto white (a transparent PNG of black text reads as
        black on white, as a viewer shows it), 16-bit greyscale is scaled to 8 bits, palette,
        CMYK and greyscale images are converted to RGB. A file is refused before decoding when
        its header declares more than `max_pixels` pixels (default: `max_image_pixels()`).

        Raises:
            QueryError: the file is missing, unreadable, too large or of an unconvertible mode;
                the message names the query and the file.
        """
        if self.image is None:
            return None
        if isinstance(self.image, Image.Image):
            return _to_rgb(self.image, self.id)
        path = Path(self.image)
        if not path.is_file():
            raise QueryError(f"query {self.id!r}: image file not found: {path}")
        limit = max_image_pixels() if max_pixels is None else max_pixels
        try:
            with _open_header(path) as im:
                _check_pixels(im, limit, path, self.id)
                return _to_rgb(im, self.id, path)
        except QueryError:
            raise
        except Image.DecompressionBombError as exc:  # Pillow's own ceiling, above ours
            raise QueryError(f"query {self.id!r}: image {path} is over Pillow's size limit ({exc}); raise "
                             f"PIL.Image.MAX_IMAGE_PIXELS as well to load it") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            # Pillow reports truncated or corrupt files with any of these
            raise QueryError(f"query {self.id!r}: cannot read image {path}: {exc}") from None


def _check_id(qid: Any) -> str:
    """A query id as a non-empty string; ints are accepted (JSON ids are often numbers)."""
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise QueryError(f"query id must be a string or an integer, got {type(qid).__name__} ({qid!r})")
    qid = str(qid)
    if not qid.strip():
        raise QueryError("query id must not be empty")
    return qid


def _check_group(qid: str, group: Any) -> None:
    """``meta["group"]`` is None, a non-empty string or an integer: a list or a float would not
    survive into a ScoreTable row (or would split a request by its spelling), silently ungrouping it."""
    if group is None:
        return
    if isinstance(group, bool) or not isinstance(group, (str, int)) or (isinstance(group, str) and not group.strip()):
        got = "an empty string" if isinstance(group, str) else f"{type(group).__name__} ({group!r})"
        raise QueryError(f"query {qid!r}: meta[{GROUP!r}] (the request it delivers) must be a non-empty string or "
                         f"an integer, got {got}")


def _check_text(qid: str, text: Any) -> str:
    """The text as a string that can be encoded (None means no text)."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise QueryError(f"query {qid!r}: text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # a lone surrogate (from a bad JSON escape or decode) would crash the tokenizer later
        raise QueryError(f"query {qid!r}: text has an invalid character {text[exc.start]!r} at position "
                         f"{exc.start} (a lone surrogate, not valid Unicode)") from None
    return text


def _check_image_field(qid: str, image: Any) -> None:
    """An image must be None, a PIL image or a non-empty path."""
    if image is None or isinstance(image, Image.Image):
        return
    if not isinstance(image, (str, os.PathLike)):
        raise QueryError(f"query {qid!r}: image must be None, a PIL image or a file path, "
                         f"got {type(image).__name__}")
    if not str(os.fspath(image)).strip():
        raise QueryError(f"query {qid!r}: image path is empty (use None for a text-only query)")


def max_image_pixels() -> int:
    """The pixel limit of `Query.load_image`: $MECHPROBE_MAX_IMAGE_PIXELS if set, else `MAX_IMAGE_PIXELS`."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(value.replace("_", ""))
    except ValueError:
        limit = 0
    if limit <= 0:
        raise InputError(f"{MAX_PIXELS_ENV}={value!r}: expected a positive number of pixels")
    return limit


def _open_header(path: Path) -> Image.Image:
    """Open `path` lazily (Pillow reads only the header) without Pillow's size warning.

    Pillow warns above its own limit; `_check_pixels` applies mechprobe's limit right after, so
    the warning would only repeat, as noise on stderr, what the check says."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _check_pixels(im: Image.Image, limit: int, path: Path, qid: str) -> None:
    """Refuse an image whose header declares more than `limit` pixels, before any decoding."""
    width, height = im.size
    if width * height > limit:
        raise QueryError(
            f"query {qid!r}: image {path} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limit:,} (checked before decoding, against decompression bombs); to allow it pass "
            f"load_image(max_pixels=...), set {MAX_PIXELS_ENV} or raise probing.query.MAX_IMAGE_PIXELS")


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _has_alpha(im: Image.Image) -> bool:
    """Whether `im` has transparent pixels to composite: an alpha band or a transparency key.

    (Not `"A" in im.getbands()`: the "A" of LAB is a colour channel.)"""
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def _gray16_to_8(im: Image.Image) -> Image.Image:
    """16-bit greyscale ("I;16*", or "I" as Pillow opens 16-bit PNGs and TIFFs) as 8-bit "L".

    Pillow's own conversion clips at 255, so most of a 16-bit image would turn white; scale the
    full 0..65535 range to 0..255 instead (values outside it, possible in mode "I", are clipped)."""
    values = np.asarray(im).astype(np.float64)
    return Image.fromarray(np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image, qid: str, path: Path | None = None) -> Image.Image:
    """`im` as 8-bit RGB, transparency composited onto white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        im = _gray16_to_8(im)
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:  # modes without an RGB conversion (e.g. "La")
        where = f"image {path}" if path is not None else "image"
        raise QueryError(f"query {qid!r}: cannot convert {where} of mode {im.mode!r} to RGB: {exc}") from None


def query_list(queries, where: str = "score") -> list[Query]:
    """``queries`` as a list of `Query`; `InputError` naming ``where`` for anything else (a string,
    one Query not in a list, an item that is not a Query), before any compute."""
    if isinstance(queries, (str, bytes, Query)) or not hasattr(queries, "__iter__"):
        hint = "; wrap one query in a list" if isinstance(queries, Query) else ""
        raise InputError(f"{where}: queries must be a list of Query objects, got {type(queries).__name__}{hint}")
    out = list(queries)
    for i, q in enumerate(out):
        if not isinstance(q, Query):
            raise InputError(f"{where}: item {i} of the queries is a {type(q).__name__}, not a Query "
                             f"(build one with Query(id, text, image=..., label=...))")
    return out


def check_unique_ids(queries: list[Query]) -> None:
    seen: set[str] = set()
    for q in queries:
        if q.id in seen:
            raise QueryError(f"duplicate query id {q.id!r}: ids pair runs across defenses and must be unique")
        seen.add(q.id)


def check_images(queries: list[Query], threads: int | None = None) -> None:
    """Decode every distinct image file of ``queries`` once, before any compute, so a missing,
    truncated or corrupt file is reported at the start of a run, not when its batch comes up
    (a loader checks only that the path is a file; a truncated file still opens). Raises one
    `QueryError` naming each unreadable file's first query and the reason (the first ten)."""
    first: dict[str, Query] = {}
    for q in queries:
        if q.image is not None and not isinstance(q.image, Image.Image):
            first.setdefault(os.fspath(q.image), q)
    if not first:
        return

    def problem(q: Query) -> str | None:
        try:
            q.load_image()
        except QueryError as exc:
            return str(exc)
        return None

    workers = threads or min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding releases the GIL
        problems = [p for p in pool.map(problem, first.values()) if p is not None]
    if problems:
        more = f"; ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise QueryError(f"{len(problems)} of {len(first)} image files cannot be used: "
                         + "; ".join(problems[:10]) + more)


def row_meta(query: Query) -> dict:
    """What a ScoreTable row keeps of its query: text, whether it has an image, scalar metadata."""
    scalars = {k: v for k, v in query.meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
    return {"text": query.text, "has_image": query.has_image, **scalars}
