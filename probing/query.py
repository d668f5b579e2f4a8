"""The unit of work: one labelled request, optionally with an image."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .errors import QueryError

LABELS = ("harmful", "benign")


@dataclass(frozen=True)
class Query:
    """One request to score (immutable: make variants with ``dataclasses.replace``).

    Attributes:
        id: unique identifier, used to pair runs of the same query under different defenses.
        text: the user's request (may be empty when an image carries it).
        image: None, a PIL image, or a path to an image file.
        label: "harmful", "benign", or None when unknown.
        meta: free-form metadata (scenario, kind, source, ...).
    """

    id: str
    text: str = ""
    image: Image.Image | str | os.PathLike | None = None
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # frozen: normalise through object.__setattr__, once, at construction
        object.__setattr__(self, "id", str(self.id))
        if self.text is None:
            object.__setattr__(self, "text", "")
        if not isinstance(self.text, str):
            raise QueryError(f"query {self.id!r}: text must be a string, got {type(self.text).__name__}")
        if not self.text.strip() and self.image is None:
            raise QueryError(f"query {self.id!r} has neither text nor image")
        if self.label is not None and self.label not in LABELS:
            raise QueryError(f"query {self.id!r}: label must be one of {LABELS} or None, got {self.label!r}")

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def load_image(self) -> Image.Image | None:
        """The image as an RGB PIL image; clear errors for missing or unreadable files."""
        if self.image is None:
            return None
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        path = Path(self.image)
        if not path.is_file():
            raise QueryError(f"query {self.id!r}: image file not found: {path}")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise QueryError(f"query {self.id!r}: cannot read image {path}: {exc}") from exc


def check_unique_ids(queries: list[Query]) -> None:
    seen: set[str] = set()
    for q in queries:
        if q.id in seen:
            raise QueryError(f"duplicate query id {q.id!r}: ids pair runs across defenses and must be unique")
        seen.add(q.id)
