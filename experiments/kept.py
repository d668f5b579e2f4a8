"""Defenses whose costly products are kept in the run directory, so a run makes each once.

- `SavedModel` wraps a model defense (``mo_finetune``): the model tuned from the run's own model is
  saved in ``<out>/models/<name>/`` (LoRA adapters merged into a copy,
  `defenses.finetune.merge_adapters`) and loaded by later uses and by resumed runs.
- `CachedRewrite` wraps a query-rewriting defense (captions, intentions): its generations are
  cached per defense and model in ``<out>/generations/``, keyed by `query_key` (id, text, image),
  so an ensemble reuses the single run's captions and an edited query is rewritten again.

`kept(defense, folder, ...)` wraps whichever applies. Used by `mechprobe study` and by the
Session experiments (`mechanisms`, `ensembles`, `layerwise`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from defenses.base import Defense
from defenses.composite import Compose
from defenses.finetune import FineTune, merge_adapters
from defenses.rewriting import AskFirst, Caption
from probing import load_model
from probing.query import Query

logger = logging.getLogger(__name__)


def safe_name(name: str) -> str:
    """``name`` as a file name: characters other than letters, digits and ``-_.+`` become ``_``."""
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


@dataclass
class _Wrapper(Defense):
    inner: Defense | None = None
    folder: Path | None = None

    def __post_init__(self):
        for key in ("name", "category", "params", "aggregate", "edit_positions"):
            setattr(self, key, getattr(self.inner, key))


@dataclass
class SavedModel(_Wrapper):
    """A model defense (``mo_finetune``) trained once and saved in ``folder``; later uses, and
    resumed runs, load that copy. Only the model trained from the study's own model is saved."""

    base_name: str = ""
    device: str = "cpu"
    dtype: str | None = None
    _memo: dict = field(default_factory=dict, repr=False)

    def model(self, bundle):
        if bundle.name not in self._memo:
            self._memo[bundle.name] = self._saved(bundle) if bundle.name == self.base_name else self.inner.model(bundle)
        return self._memo[bundle.name]

    def _saved(self, bundle):
        record = json.loads(json.dumps(self.inner.describe(), default=str))
        stamp = self.folder / "mechprobe.json"
        if stamp.is_file() and json.loads(stamp.read_text()) == record:
            logger.info("%s: loading the model saved in %s", self.name, self.folder)
            tuned = load_model(self.folder, device=self.device, dtype=self.dtype,
                               image_aspect_ratio=bundle.image_aspect_ratio)
            tuned.name = f"{bundle.name}+{self.name}"
            return tuned
        tuned = self.inner.model(bundle)
        merge_adapters(tuned)  # LoRA adapters merged (the run's model untouched): it loads as a plain model
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tuned.model.save_pretrained(tmp)
        bundle.processor.save_pretrained(tmp)
        (tmp / "mechprobe.json").write_text(json.dumps(record, indent=1))
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, self.folder)
        logger.info("%s: saved the tuned model in %s", self.name, self.folder)
        return tuned


def _image_digest(image) -> str:
    if image is None:
        return "none"
    if isinstance(image, (str, os.PathLike)):
        # as the shard records identify an image file: a file rewritten under the same path gets
        # a new key, so its cached caption is not reused (a missing file: the path alone; loading
        # it then raises the error that names the query)
        path = Path(image).resolve()
        try:
            st = path.stat()
        except OSError:
            return f"path:{path}"
        return f"path:{path}:{st.st_size}:{st.st_mtime_ns}"
    return "pil:" + hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()


def query_key(q: Query) -> str:
    return hashlib.sha1("\0".join((q.id, q.text, _image_digest(q.image))).encode()).hexdigest()


#: how `Caption` pairs its captions with the queries: 2 = by position, each noisy copy of a query
#: its own; before (1), by id, so that every noisy copy of a query (an NI member before the caption in
#: a composite: the copies share the query's id) got the caption of the last copy. The generation
#: cache files record it (``{"revision": 2, "entries": {query_key: variants}}``; a file of revision
#: 1, the entries alone, is read by `_load_file`), so that no wrong caption is reused.
CAPTION_REVISION = 2


def _load_file(file: Path) -> dict:
    """The cached generations in ``file`` (none if it does not exist or is of another revision)."""
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    if data.get("revision") == CAPTION_REVISION:
        return data["entries"]
    if "revision" in data:
        logger.info("%s: generation cache of revision %s, not %d: not reused", file, data["revision"],
                    CAPTION_REVISION)
        return {}
    # Revision 1: an entry whose query id another entry shares may be a noisy copy's wrong caption.
    ids: dict[str, int] = {}
    for variants in data.values():
        for v in {v["id"] for v in variants}:
            ids[v] = ids.get(v, 0) + 1
    trusted = {k: variants for k, variants in data.items() if all(ids[v["id"]] == 1 for v in variants)}
    if len(trusted) < len(data):
        logger.info("%s: %d of %d cached generations written before revision %d (query ids shared by several "
                    "entries, e.g. noisy copies) are generated again", file, len(data) - len(trusted), len(data),
                    CAPTION_REVISION)
    return trusted


def captions_noisy_copies(defense) -> bool:
    """Whether ``defense`` captions noisy copies of a query: a composite with an NI member before a
    `Caption` (or one inside a score-level ensemble). Scores of such a defense made before
    `CAPTION_REVISION` gave all the copies one caption: the study and `Session` put the revision
    in its condition's fingerprint, so its shards from then are scored again."""
    members = getattr(defense, "members", None) or []
    if not isinstance(defense, Compose):
        return any(captions_noisy_copies(m) for m in members)
    noisy = False
    for m in members:
        if noisy and isinstance(getattr(m, "inner", m), Caption):
            return True
        noisy = noisy or m.category == "NI" or captions_noisy_copies(m)
    return False


@dataclass
class CachedRewrite(_Wrapper):
    """A query-rewriting defense whose generations are cached per (defense, model) in ``folder``,
    so a composite ``qr+sr`` reuses the single run's captions. Variants are cached only when they
    keep the query's image or drop it (what every QR defense does)."""

    _mem: dict = field(default_factory=dict, repr=False)

    def _file(self, bundle) -> Path:
        return self.folder / f"{safe_name(self.name)}@{safe_name(bundle.name)}.json"

    def _cache(self, bundle) -> tuple[Path, dict]:
        file = self._file(bundle)
        if file not in self._mem:
            self._mem[file] = _load_file(file)
        return file, self._mem[file]

    def todo(self, queries, bundle) -> list[Query]:
        """The queries `transform` would generate for: those without cached generations."""
        _, cache = self._cache(bundle)
        return [q for q in queries if query_key(q) not in cache]

    def transform(self, queries, bundle):
        file, cache = self._cache(bundle)
        keys = [query_key(q) for q in queries]
        if len(set(keys)) != len(keys):
            return self.inner.transform(queries, bundle)
        todo = [i for i, k in enumerate(keys) if k not in cache]
        fresh = {}
        if todo:
            outs = self.inner.transform([queries[i] for i in todo], bundle)
            for i, variants in zip(todo, outs):
                fresh[keys[i]] = variants
                stored = [self._store(queries[i], vq, spec) for vq, spec in variants]
                if all(s is not None for s in stored):
                    cache[keys[i]] = stored
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(file.name + ".tmp")
            tmp.write_text(json.dumps({"revision": CAPTION_REVISION, "entries": cache}))
            os.replace(tmp, file)
        return [fresh[k] if k in fresh else [self._load(q, v) for v in cache[k]] for q, k in zip(queries, keys)]

    @staticmethod
    def _store(q: Query, vq: Query, spec):
        if vq.image is not None and vq.image is not q.image:
            return None
        try:
            if json.loads(json.dumps(vq.meta)) != vq.meta:
                return None
        except (TypeError, ValueError):
            return None
        return {"id": vq.id, "text": vq.text, "image": vq.image is not None, "label": vq.label, "meta": vq.meta,
                "spec": None if spec is None else dataclasses.asdict(spec)}

    @staticmethod
    def _load(q: Query, v: dict):
        from probing.render import PromptSpec

        return (Query(v["id"], v["text"], q.image if v["image"] else None, v["label"], v["meta"]),
                None if v["spec"] is None else PromptSpec(**v["spec"]))


def kept(defense: Defense, run_path: Path, name: str, base_name: str, device: str = "cpu",
         dtype: str | None = None) -> Defense:
    """``defense`` with its costly product kept under ``run_path``: a fine-tune saved in
    ``models/<name>/``, a rewrite's generations in ``generations/``; any other defense as it is."""
    if isinstance(defense, FineTune):
        return SavedModel(inner=defense, folder=Path(run_path) / "models" / safe_name(name), base_name=base_name,
                          device=device, dtype=dtype)
    if isinstance(defense, (Caption, AskFirst)):
        return CachedRewrite(inner=defense, folder=Path(run_path) / "generations")
    return defense
