"""Defenses whose costly products are kept in the run directory, so a run makes each once.

- `SavedModel` wraps a model defense (``mo_finetune``): the model tuned from the run's own model is
  saved in ``<out>/models/<name>/`` and loaded by later uses and by resumed runs. A LoRA tune
  saves its adapters alone (``adapters.safetensors``: 17 MB at 7B, where the merged model is
  13.5 GB), applied to the run's own model and merged (`defenses.finetune.merge_adapters`) when
  loaded; a full fine-tune saves the model and its processor.
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

from safetensors.torch import load_file, save_file

from defenses.base import Defense
from defenses.finetune import FineTune, adapter_tensors, merge_adapters
from defenses.rewriting import AskFirst, Caption
from probing import load_model
from probing.errors import DataError, MissingDataError
from probing.model import file_sha256
from probing.query import Query

from .runs import read_cache, write_atomic

logger = logging.getLogger(__name__)

#: a LoRA tune's adapter weights in a `SavedModel` folder (by their names in the language model)
ADAPTERS_FILE = "adapters.safetensors"
#: the stamp's key for that file's sha256 (checked before the adapters are applied)
ADAPTERS_SHA256 = "adapters_sha256"


def safe_name(name: str) -> str:
    """``name`` as a file name: characters other than letters, digits and ``-_.+`` become ``_``."""
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


@dataclass
class _Wrapper(Defense):
    inner: Defense | None = None
    folder: Path | None = None
    #: what identifies the run's own model (`probing.model.model_fingerprint`: name, config, weights,
    #: dtype, image handling): a product made from another model, or with another dtype or image
    #: handling, is never reused, also where the run's config.json was deleted to resume
    base: dict | None = None

    def __post_init__(self):
        for key in ("name", "category", "params", "aggregate", "edit_positions"):
            setattr(self, key, getattr(self.inner, key))


@dataclass
class SavedModel(_Wrapper):
    """A model defense (``mo_finetune``) trained once and saved in ``folder``; later uses, and
    resumed runs, load that copy. Only the model trained from the study's own model is saved (so
    its adapters, applied to that model, rebuild it: the run's fingerprint fixes the model)."""

    base_name: str = ""
    device: str = "cpu"
    dtype: str | None = None
    _memo: dict = field(default_factory=dict, repr=False)

    def model(self, bundle):
        if bundle.name not in self._memo:
            self._memo[bundle.name] = self._saved(bundle) if bundle.name == self.base_name else self.inner.model(bundle)
        return self._memo[bundle.name]

    def _saved(self, bundle):
        record = json.loads(json.dumps({**self.inner.describe(), "base_model": self.base}, default=str))
        stamp = self.folder / "mechprobe.json"
        saved = read_cache(stamp, "training again")
        checksum = saved.pop(ADAPTERS_SHA256, None)
        if saved and saved == record:
            try:
                return self._load(bundle, checksum)
            except Exception as exc:  # noqa: BLE001 -- a damaged copy is made again, as a damaged shard is
                logger.warning("%s: the tuned model saved in %s cannot be loaded (%s: %s): training again",
                               self.name, self.folder, type(exc).__name__, exc)
        elif saved:
            logger.info("%s: %s was saved for another defense record or base model: training again",
                        self.name, self.folder)
        tuned = self.inner.model(bundle)
        adapters = adapter_tensors(tuned.model)
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if adapters:  # the run's own model plus these is the tuned model: MBs, not a model's GBs
            save_file({k: v.contiguous() for k, v in adapters.items()}, str(tmp / ADAPTERS_FILE))
            record = {**record, ADAPTERS_SHA256: file_sha256(tmp / ADAPTERS_FILE)}
        merge_adapters(tuned)  # LoRA adapters merged (the run's model untouched): scored as a plain model
        if not adapters:
            tuned.model.save_pretrained(tmp)
            bundle.processor.save_pretrained(tmp)
        (tmp / "mechprobe.json").write_text(json.dumps(record, indent=1))
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(tmp, self.folder)
        logger.info("%s: saved the tuned %s in %s", self.name, "model's adapters" if adapters else "model",
                    self.folder)
        return tuned

    def _load(self, bundle, checksum: str | None):
        """The saved tune: LoRA adapters applied to ``bundle`` (the run's own model) and merged, as
        when it was trained (the file must match the stamp's ``checksum``); or, for a full
        fine-tune, the whole model saved there. Raises if the folder does not hold what the stamp
        says (`_saved` then trains again)."""
        if checksum is not None:
            file = self.folder / ADAPTERS_FILE
            if not file.is_file():
                raise MissingDataError(f"{file} is missing")
            if file_sha256(file) != checksum:
                raise DataError(f"{file} differs from the file saved (sha256 mismatch)")
            logger.info("%s: loading the adapters saved in %s", self.name, self.folder)
            tuned = self.inner.from_adapters(bundle, load_file(str(file)))
            merge_adapters(tuned)
            return tuned
        logger.info("%s: loading the model saved in %s", self.name, self.folder)
        tuned = load_model(self.folder, device=self.device, dtype=self.dtype,
                           image_aspect_ratio=bundle.image_aspect_ratio)
        tuned.name = f"{bundle.name}+{self.name}"
        tuned.extra["identity"] = self.inner.identity()
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


#: the layout of a generation cache file: ``{"revision": 2, "entries": {query_key: variants}}``, a
#: variant holding only what the rewrite made (its text, whether it kept the image, the metadata it
#: added, its prompt spec). A file of another layout is not read (its generations are made again);
#: revision 1 was the entries alone, written when `Caption` paired captions by id (every noisy copy
#: of a query got the last copy's caption) and replayed each query's old metadata.
CACHE_REVISION = 2


def _load_file(file: Path) -> dict:
    """The cached generations in ``file`` (none if it is absent, unreadable or of another layout)."""
    data = read_cache(file, "generating again")
    if data and data.get("revision") != CACHE_REVISION:
        logger.info("%s: generation cache of another layout: generating again", file)
        return {}
    return data.get("entries", {})


@dataclass
class CachedRewrite(_Wrapper):
    """A query-rewriting defense whose generations are cached per (defense, model) in ``folder``,
    so a composite ``qr+sr`` reuses the single run's captions. Variants are cached only when they
    keep the query's image or drop it (what every QR defense does).

    A cache file belongs to the defense's record (its question, token budget...) and to the model
    that generated (`ModelBundle.extra`'s ``"identity"``: a fine-tune's parameters, a checkpoint's
    fingerprint; the run's own model is fixed by the run's fingerprint): its name carries a digest
    of both, so generations made with other parameters or by another tuned model are never read."""

    _mem: dict = field(default_factory=dict, repr=False)

    def _file(self, bundle) -> Path:
        owner = json.dumps({"defense": self.inner.describe(), "model": getattr(bundle, "extra", {}).get("identity"),
                            "base_model": self.base}, sort_keys=True, default=str)
        digest = hashlib.sha1(owner.encode()).hexdigest()[:12]
        return self.folder / f"{safe_name(self.name)}@{safe_name(bundle.name)}-{digest}.json"

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
            write_atomic(file, json.dumps({"revision": CACHE_REVISION, "entries": cache}))
        return [fresh[k] if k in fresh else [self._load(q, v) for v in cache[k]] for q, k in zip(queries, keys)]

    @staticmethod
    def _store(q: Query, vq: Query, spec):
        """What the rewrite made of ``q``: its text, whether it kept the image, the metadata it added
        or changed; None when that cannot be stored (a new image, metadata that is not JSON)."""
        if vq.image is not None and vq.image is not q.image:
            return None
        if vq.id != q.id or vq.label != q.label:
            return None
        added = {k: v for k, v in vq.meta.items() if k not in q.meta or q.meta[k] != v}
        if set(q.meta) - set(vq.meta):
            return None
        try:
            if json.loads(json.dumps(added)) != added:
                return None
        except (TypeError, ValueError):
            return None
        return {"text": vq.text, "image": vq.image is not None, "added": added,
                "spec": None if spec is None else dataclasses.asdict(spec)}

    @staticmethod
    def _load(q: Query, v: dict):
        """The variant from what `_store` kept, on the query as it is now (its id, label, image and
        metadata: a dataset re-tagged since keeps its new tags)."""
        from probing.render import PromptSpec

        return (Query(q.id, v["text"], q.image if v["image"] else None, q.label, {**q.meta, **v["added"]}),
                None if v["spec"] is None else PromptSpec(**v["spec"]))


def kept(defense: Defense, run_path: Path, name: str, base_name: str, device: str = "cpu",
         dtype: str | None = None, base: dict | None = None) -> Defense:
    """``defense`` with its costly product kept under ``run_path``: a fine-tune saved in
    ``models/<name>/``, a rewrite's generations in ``generations/``; any other defense as it is.
    ``base``: what identifies the run's model (`probing.model.model_fingerprint`), kept with the
    product so that it is made again for another model."""
    if isinstance(defense, FineTune):
        return SavedModel(inner=defense, folder=Path(run_path) / "models" / safe_name(name), base_name=base_name,
                          device=device, dtype=dtype, base=base)
    if isinstance(defense, (Caption, AskFirst)):
        return CachedRewrite(inner=defense, folder=Path(run_path) / "generations", base=base)
    return defense
