"""The scorer's data pipeline: batches prepared ahead of the forward, pixel values computed once.

Three pieces, all used by `RefusalScorer.score`:

`Prefetcher`
    runs ``fn(item)`` for a list of items in one background thread, at most ``depth`` results
    ahead of the consumer (a bounded queue), and yields the results in order. While the model
    runs batch k, the worker decodes and processes the images of batch k+1. An exception in the
    worker is raised in the consumer when it reaches that item (with the worker's traceback);
    `close` (also run by ``with``) stops and joins the worker, so no thread outlives the block,
    also after an error or Ctrl-C in the consumer. ``depth=0`` runs everything inline.
    ``first``: the first item's result, already computed (the study's plan-ahead worker prepares
    a chunk's first batches while the previous chunk is scored): yielded without computing it.

`HostResults`
    each batch's results copied to the host one batch late, so the host never waits for the
    device between batches (on CUDA; elsewhere at once).

`PixelCache`
    processed ``pixel_values`` per image, a bounded LRU by bytes, so that the same image scored
    under several prompt conditions (or several defenses) in one scorer's lifetime is decoded and
    run through the image processor once. Keys cannot be reused wrongly:

    - an image file: resolved path, device, inode, size, mtime and ctime in nanoseconds (ctime
      changes on any write and cannot be set back by a user), and the pixel limit in force;
    - an in-memory PIL image: a 160-bit BLAKE2b digest of its RGB pixels and its size, so a
      changed or different image (even at a reused ``id()``) never hits another's entry.

    Entries are stored in the model's dtype: 3 x 336 x 336 values, 1.29 MiB in float32 and
    0.65 MiB in bfloat16 for LLaVA-1.5's processor. The default budget of 1024 MiB holds about 790
    images in float32 (1580 in bf16); an LRU cache smaller than a run's distinct images gets no
    hits across conditions that visit all images in the same order, so size it to the dataset or
    use ``policy="keep"`` (what `experiments.study` does: sized to the run, first come kept).

The same class holds the scorer's **image-feature cache**: the vision tower + projector output
per image (``[image_seq_length, d_model]`` on the model's device, 4.7 MB in bf16 for
LLaVA-1.5-7B), keyed by the image key and `vision_version`; `cached_image_inputs` hands the
trunk ``inputs_embeds`` with the cached features in the image positions, so an image scored
under several conditions goes through the vision tower once.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image

from .cuda_graphs import ShapeGraphs, graph_obstacle
from .errors import InputError, ScoringError
from .query import Query, max_image_pixels
from .render import encode, encode_pixels

logger = logging.getLogger(__name__)

#: default byte budget of a scorer's pixel cache (MiB)
DEFAULT_PIXEL_CACHE_MB = 1024
#: default byte budget of a scorer's image-feature cache (MiB, on the model's device)
DEFAULT_FEATURE_CACHE_MB = 1024


#: `Prefetcher`'s ``first`` when no result is ready
NOT_READY = object()


class Prefetcher:
    """``fn(item)`` for each item, computed ahead in a background thread (see the module docstring).

    Attributes:
        wait_s: seconds the consumer spent waiting for results (inline: computing them).
    """

    def __init__(self, fn: Callable, items: Iterable, depth: int = 2, name: str = "mechprobe-prefetch",
                 eager: bool = False, first=NOT_READY):
        if depth < 0:
            raise InputError(f"prefetch depth must be >= 0, got {depth}")
        self.fn, self.items, self.depth, self.name = fn, list(items), depth, name
        #: results computed before the block (``first``), then the items still to compute
        self._ready = [] if first is NOT_READY or not self.items else [first]
        self._todo = self.items[len(self._ready):]
        #: a worker even for a single item: the caller enters the block, does other work, then
        #: iterates (one item alone is otherwise computed inline when it is asked for)
        self.eager = eager
        self.wait_s = 0.0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # -- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        for item in self._todo:
            if self._stop.is_set():
                return
            try:
                result = (True, self.fn(item))
            except BaseException as exc:  # handed to the consumer, raised there
                result = (False, exc)
            if not self._put(result) or not result[0]:
                return

    def _put(self, result) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(result, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise ScoringError(f"{self.name}: the worker stopped without a result") from None

    # -- the consumer ------------------------------------------------------------------------

    def __enter__(self) -> "Prefetcher":
        if self.depth > 0 and self._todo and (len(self.items) > 1 or self.eager):
            self._queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        return self

    def __iter__(self) -> Iterator:
        yield from self._ready
        if self._thread is None:  # inline: depth 0, a single item, or not entered
            for item in self._todo:
                start = time.perf_counter()
                value = self.fn(item)
                self.wait_s += time.perf_counter() - start
                yield value
            return
        for _ in self._todo:
            start = time.perf_counter()
            ok, value = self._get()
            self.wait_s += time.perf_counter() - start
            if not ok:
                raise value
            yield value

    def close(self) -> None:
        """Stop the worker and wait for it (it finishes the item it is computing, then exits)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __exit__(self, *exc) -> None:
        self.close()


def pinned(tensors: dict, device) -> dict:
    """``tensors`` (CPU) in page-locked memory when they are bound for a CUDA ``device``, else as
    they are. Called in the prefetch worker: from pinned memory `to_device` copies without the
    host waiting (from pageable memory the driver may first wait for the device)."""
    if torch.device(device).type != "cuda":
        return tensors
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
            for k, v in tensors.items()}


def to_device(tensors: dict, device) -> dict:
    """``tensors`` moved to ``device`` without waiting for it. A blocking copy to a CUDA device
    waits until everything queued there has run (a stream sync), so each batch's inputs would
    drain the device before its forward is even queued; a non-blocking one is queued behind the
    work already there, in order, on the same stream."""
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}


class HostResults:
    """A scoring loop's results, written into its host tensors (``margin [N]``, ``lens [N, L]``,
    ``hidden [N, L, d]`` or None) one batch late, so the host does not wait for the device
    between batches: on CUDA, `add` queues each batch's copies to the host without waiting
    (``non_blocking``, into pinned memory) and writes the previous batch's, whose forward has
    finished by then; while the host prepares and queues the next forward, the device still runs
    this one. Elsewhere every batch is written at once. `flush` after the last batch."""

    def __init__(self, margin: torch.Tensor, lens: torch.Tensor, hidden: torch.Tensor | None):
        self.margin, self.lens, self.hidden = margin, lens, hidden
        self._pending = None

    def add(self, idx: torch.Tensor, margin: torch.Tensor, lens: torch.Tensor, hidden: torch.Tensor | None) -> None:
        self.flush()
        hidden = hidden.float() if hidden is not None and self.hidden is not None else None
        if margin.device.type != "cuda":
            self._write(idx, margin, lens, hidden)
            return
        copies = [None if t is None else t.to("cpu", non_blocking=True) for t in (margin, lens, hidden)]
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(margin.device))  # where the copies were queued (device_map)
        self._pending = (idx, copies, done)

    def flush(self) -> None:
        if self._pending is None:
            return
        idx, copies, done = self._pending
        self._pending = None
        done.synchronize()
        self._write(idx, *copies)

    def _write(self, idx, margin, lens, hidden) -> None:
        self.margin[idx] = margin.cpu()
        self.lens[idx] = lens.cpu()
        if hidden is not None:
            self.hidden[idx] = hidden.cpu()


class PixelCache:
    """Processed pixel values (or image features) per image within ``max_bytes`` (see the module
    docstring).

    ``policy``: "lru" (default) evicts the least recently used entry to make room; "keep" admits
    entries while there is room and then stores nothing more. A run that visits the same images
    condition after condition is a repeated scan, which LRU turns into zero hits once the images
    outnumber the budget; "keep" then still serves the first images that fit on every pass.
    Thread-safe. ``max_bytes=0`` disables it (every lookup misses, nothing is stored).

    **Staged images** (`stage_images`, `unstage`): pixel values computed ahead for particular
    in-memory image *objects* (a study chunk's noise-injected copies, built while the previous
    chunk is scored), held outside the byte budget until unstaged and found by object identity, so
    `encode_batch` neither hashes nor processes them again. The entry holds the image itself, so
    its ``id()`` cannot pass to another object while staged.
    """

    POLICIES = ("lru", "keep")

    def __init__(self, max_bytes: int = DEFAULT_PIXEL_CACHE_MB * 2**20, policy: str = "lru"):
        if max_bytes < 0:
            raise InputError(f"pixel cache size must be >= 0, got {max_bytes}")
        if policy not in self.POLICIES:
            raise InputError(f"cache policy must be one of {self.POLICIES}, got {policy!r}")
        self.policy = policy
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict = OrderedDict()
        self._staged: dict[int, tuple] = {}  # id(image) -> (image, key, value)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if self.policy == "keep" and key not in self._entries and self.bytes + size > self.max_bytes:
                return  # full: keep what is there
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._staged.clear()
            self.bytes = 0

    def staged(self, image) -> tuple[tuple, torch.Tensor] | None:
        """``(key, pixel values)`` staged for this very image object, else None."""
        with self._lock:
            entry = self._staged.get(id(image))
        return entry[1:] if entry is not None and entry[0] is image else None

    def stage_images(self, bundle, queries: Sequence[Query], threads: int = 1, keep: Sequence[Query] = ()) -> list:
        """Compute ahead what `encode_batch` needs for the images of ``queries`` (``threads`` at
        once: PIL and torch release the GIL). In-memory images: key and pixel values staged for
        the object (their key is a hash of every pixel, not computed again). Images of ``keep``
        (the run's own images, not transient copies) are also stored in the cache as usual, so a
        "keep" cache fills with the images later passes need, not with noise copies seen once.
        Returns the staged images, for `unstage`."""
        kept = {id(q.image) for q in keep if q.has_image}
        todo = list({id(q.image): q for q in queries if q.has_image and not (
            isinstance(q.image, Image.Image) and self.staged(q.image) is not None)}.values())
        done = map_threads(lambda q: image_pixels(bundle, q, self, store=id(q.image) in kept), todo, threads,
                           "mechprobe-pixels")
        staged = []
        with self._lock:
            for q, (key, value) in zip(todo, done):
                if isinstance(q.image, Image.Image):
                    self._staged[id(q.image)] = (q.image, key, value)
                    staged.append(q.image)
        return staged

    def unstage(self, images) -> None:
        """Drop the staged entries of ``images`` (those `stage_images` returned)."""
        with self._lock:
            for image in images:
                entry = self._staged.get(id(image))
                if entry is not None and entry[0] is image:
                    del self._staged[id(image)]


_MODULE_UIDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_NEXT_UID = itertools.count()
_UID_LOCK = threading.Lock()


def _uid(module) -> int:
    """A number no other module object ever gets in this process (unlike ``id()``, which a new
    object can reuse once the old one is freed; a deep copy is a new object, so a new number)."""
    with _UID_LOCK:
        if module not in _MODULE_UIDS:
            _MODULE_UIDS[module] = next(_NEXT_UID)
        return _MODULE_UIDS[module]


def vision_modules(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """What computes a LLaVA model's image features: its vision tower and its projector."""
    return model.model.vision_tower, model.model.multi_modal_projector


def vision_version(model) -> tuple:
    """What identifies the image features a LLaVA model computes: its vision tower and projector
    (as objects: a fine-tuned deep copy is another one) and the in-place version counters of their
    parameters (an optimizer step or a load_state_dict bumps them), so features cached before a
    weight change are never served after it."""
    mods = vision_modules(model)
    return (tuple(_uid(m) for m in mods),
            sum(p._version for m in mods for p in m.parameters()))


def image_features(model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """One ``[image_seq_length, d_model]`` tensor per image (views of one batch output): what the
    LLaVA trunk scatters into the image token positions (vision tower, feature layer, projector),
    as its own forward computes it.

    On a CUDA device without gradients, replayed from a CUDA graph recorded for the batch's shape
    (`probing.cuda_graphs.ShapeGraphs`): the vision tower's ~400 small kernels were launch-bound
    there (docs/performance.md §2b). Eager when its modules have hooks, are compiled, or
    ``MECHPROBE_CUDA_GRAPHS=0``."""
    if pixel_values.is_cuda and not torch.is_grad_enabled():
        graphs = _vision_graphs(model)
        if graphs is not None:
            return list(graphs(pixel_values))
    return list(_features(model, pixel_values))


def _features(model, pixel_values: torch.Tensor):
    cfg = model.config
    out = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    return out.pooler_output if hasattr(out, "pooler_output") else out


_VISION_GRAPHS: "weakref.WeakKeyDictionary[torch.nn.Module, ShapeGraphs]" = weakref.WeakKeyDictionary()


def _vision_graphs(model) -> ShapeGraphs | None:
    """The model's vision-tower graphs, or None when its vision modules cannot be graphed now."""
    if graph_obstacle(vision_modules(model)) is not None:
        return None
    graphs = _VISION_GRAPHS.get(model)
    if graphs is None:
        ref = weakref.ref(model)  # the graphs must not keep the model alive

        def run(x):
            out = _features(ref(), x)
            return out if isinstance(out, torch.Tensor) else torch.stack(list(out))

        def weights():  # where the weights are: a replaced parameter must not be read from its old place
            return tuple(p.data_ptr() for m in vision_modules(ref()) for p in m.parameters())

        graphs = _VISION_GRAPHS[model] = ShapeGraphs(run, weights, name="vision tower")
    return graphs


def embed_with_features(model, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The trunk's input embeddings with ``features`` in the image token positions: the same
    operations as `LlavaModel.forward` (token embedding, then masked_scatter of the features in
    the embedding dtype)."""
    embeds = model.model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, features.to(embeds.device, embeds.dtype))


def cached_image_inputs(model, inputs: dict, keys: list, cache: PixelCache, version) -> dict:
    """``inputs`` with ``pixel_values`` replaced by ``inputs_embeds`` whose image positions hold
    features from ``cache`` (one entry per image key and `vision_version`); the images it lacks
    go through the vision tower together, as the trunk would run them, and are stored.

    ``pixel_values`` may still be on the host (the other inputs on the model's device): only the
    missing images' pixels are then copied over (`to_device`), the rest never leave the host."""
    if "pixel_values" not in inputs or not cache.enabled:
        return inputs
    pixel_values = inputs["pixel_values"]
    if len(keys) != pixel_values.shape[0]:
        raise ScoringError(f"feature cache: {len(keys)} image keys for {pixel_values.shape[0]} images")
    found = [cache.get((key, version)) for key in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        device = inputs["input_ids"].device
        todo = pixel_values if len(missing) == len(keys) else pixel_values[missing]
        if todo.device != device:
            if todo is not pixel_values and device.type == "cuda":  # the selection is new, pageable memory
                todo = todo.pin_memory()
            todo = todo.to(device, non_blocking=True)
        fresh = image_features(model, todo)
        for i, f in zip(missing, fresh):
            found[i] = f.clone()  # its own storage, so the cache's byte count is what it holds
            cache.put((keys[i], version), found[i])
    out = {k: v for k, v in inputs.items() if k not in ("pixel_values", "input_ids")}
    out["inputs_embeds"] = embed_with_features(model, inputs["input_ids"], torch.stack(found))
    return out


def device_inputs(model, inputs: dict, device, keys: list | None, cache: PixelCache, version) -> dict:
    """A batch's model inputs (host tensors, `pinned` by the prefetch worker) on ``device``, queued
    without the host waiting for the device (`to_device`). With image ``keys`` and an enabled
    feature ``cache`` the pixel values stay on the host: `cached_image_inputs` copies only those of
    the images the cache lacks and hands the trunk ``inputs_embeds``."""
    pixels = inputs.get("pixel_values") if keys and cache.enabled else None
    if pixels is None:
        return to_device(inputs, device)
    out = to_device({k: v for k, v in inputs.items() if k != "pixel_values"}, device)
    with torch.inference_mode():
        return cached_image_inputs(model, {**out, "pixel_values": pixels}, keys, cache, version)


def image_key(query: Query) -> tuple[tuple, Image.Image | None]:
    """The cache key of a query's image, and the decoded RGB image when computing the key needed
    it (in-memory images are hashed on their RGB pixels)."""
    if isinstance(query.image, Image.Image):
        rgb = query.load_image()
        digest = hashlib.blake2b(rgb.tobytes(), digest_size=20).digest()
        return ("pixels", rgb.size, digest), rgb
    path = Path(query.image).resolve()
    st = path.stat()
    return ("file", str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
            max_image_pixels()), None


def process_image(bundle, image: Image.Image) -> torch.Tensor:
    """One image through the processor's image processor: ``[3, H, W]`` in the model's dtype."""
    return bundle.processor.image_processor([image], return_tensors="pt")["pixel_values"][0].to(bundle.dtype)


def image_pixels(bundle, query: Query, cache: PixelCache | None = None, store: bool = True) -> tuple[tuple, torch.Tensor]:
    """``(image_key, pixel values)`` of a query's image: staged in ``cache`` (`PixelCache.stage_images`),
    held by it, or processed now (and stored in ``cache`` when ``store``)."""
    staged = cache.staged(query.image) if cache is not None else None
    if staged is not None:
        return staged
    try:
        key, loaded = image_key(query)
    except OSError:  # unreadable file metadata: load_image raises the error naming the query
        query.load_image()
        raise
    value = cache.get(key) if cache is not None else None
    if value is None:
        value = process_image(bundle, loaded if loaded is not None else query.load_image())
        if cache is not None and store:
            cache.put(key, value)
    return key, value


#: the most threads that process images at once (`pixel_threads`)
MAX_PIXEL_THREADS = 8


def pixel_threads() -> int:
    """Threads for processing a batch's images at once: the machine's cores, at most
    `MAX_PIXEL_THREADS` (PIL's resize and the normalisation release the GIL; more threads than
    that only contend for memory bandwidth)."""
    return min(os.cpu_count() or 1, MAX_PIXEL_THREADS)


def map_threads(fn: Callable, items: Sequence, threads: int, name: str) -> list:
    """``[fn(x) for x in items]``, in up to ``threads`` threads named ``name`` (inline for one);
    for work that releases the GIL (numpy, PIL, torch)."""
    items = list(items)
    threads = min(threads, len(items))
    if threads <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix=name) as pool:
        return list(pool.map(fn, items))


def encode_batch(bundle, prompts: Sequence[str], queries: Sequence[Query], cache: PixelCache | None = None,
                 device=None, keys: list | None = None) -> dict[str, torch.Tensor]:
    """`probing.render.encode` for ``queries`` (their images loaded here), with each image's pixel
    values taken from ``cache`` when it holds them and stored there when not. Equal to
    ``encode(bundle, prompts, [q.load_image() for q in queries])`` (tests/test_pipeline.py).
    ``keys``: a list that receives each image's `image_key`, in the order of ``pixel_values``."""
    if (cache is None or not cache.enabled) and keys is None:
        return encode(bundle, list(prompts), [q.load_image() for q in queries], device=device)
    pixels = []
    for q in queries:
        if not q.has_image:
            pixels.append(None)
            continue
        key, value = image_pixels(bundle, q, cache)
        if keys is not None:
            keys.append(key)
        pixels.append(value)
    return encode_pixels(bundle, list(prompts), pixels, device=device)
