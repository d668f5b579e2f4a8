"""Supervised fine-tuning on answer tokens: the one training loop of mechprobe.

Used by the toy's trainer (probing/toy/train.py) and by the model-optimisation defense
(defenses/finetune.py); neither imports the other.

The loss is next-token cross-entropy on the answer tokens only, and the unembedding is applied
only where a label is: the trunk's hidden states at the ~10 labelled positions go through
``lm_head``, never the ``[batch, seq, vocab]`` logits of all ~600 positions (most of a step's
time and memory in the plain ``model(**batch).loss`` path).
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .render import PromptSpec, render_prompt, tokenizer_lock

logger = logging.getLogger(__name__)
IGNORE = -100


def encode_example(processor, example) -> dict:
    """input_ids / labels (answer tokens only) / pixel_values for one example (``.query``,
    ``.system``, ``.target``)."""
    prompt = render_prompt(processor, example.query, PromptSpec(system_prompt=example.system))
    image = example.query.load_image()
    images = [image] if image is not None else None
    with tokenizer_lock(processor.tokenizer):
        full = processor(text=[f"{prompt} {example.target}{processor.tokenizer.eos_token}"], images=images,
                         return_tensors="pt")
        ids = full["input_ids"][0]
        # The prompt's length as the processor alone would tokenize it (its image token expanded as
        # in ``full``), without processing the image a second time: half of the encoding's time.
        if image is not None:
            per_image = int((ids == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())
            prompt = prompt.replace(processor.image_token, processor.image_token * per_image)
        n_prompt = len(processor.tokenizer(prompt)["input_ids"])
    labels = ids.clone()
    labels[:n_prompt] = IGNORE
    return {"input_ids": ids, "labels": labels,
            "pixel_values": full["pixel_values"][0] if image is not None else None}


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-padded batch; images stacked in row order."""
    n = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for r, x in enumerate(items):
        k = len(x["input_ids"])
        ids[r, :k], labels[r, :k], mask[r, :k] = x["input_ids"], x["labels"], 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pixels = [x["pixel_values"] for x in items if x["pixel_values"] is not None]
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, unembedding only those positions.

    Equal (up to float summation order) to ``LlavaForConditionalGeneration(**batch).loss``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state  # [batch, seq, d_model]
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])  # [n_labelled, vocab]
    return F.cross_entropy(logits.float(), target[keep])


def causal_lm_loss(model, batch: dict) -> torch.Tensor:
    """The HF model's own loss, ``model(**batch).loss``: full-vocabulary logits at every position.
    Used where the vocabulary is small and bit-for-bit reproduction of earlier weights matters
    (the toy); `answer_loss` is the same number up to float summation order."""
    return model(**batch, use_cache=False).loss


def epoch_batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Batches of row indices, each row once per shuffled epoch (an epoch's tail joins the next)."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            more = list(range(n))
            rng.shuffle(more)
            order += more
        rows, order = order[:batch_size], order[batch_size:]
        yield rows


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, pool: int = 16):
    """Endless batches of row indices: every epoch shuffled, then each run of ``pool`` batches
    regrouped by length (far less padding) and emitted in random order."""
    while True:
        rows = list(range(len(lengths)))
        rng.shuffle(rows)
        for s in range(0, len(rows), batch_size * pool):
            chunk = sorted(rows[s:s + batch_size * pool], key=lambda i: lengths[i])
            group = [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
            rng.shuffle(group)
            yield from group


def sampled_batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Batches drawn without replacement within a batch, independently per step."""
    while True:
        yield rng.sample(range(n), min(batch_size, n))


def fit(model, params: Sequence[torch.nn.Parameter], encoded: list[dict], *, steps: int, lr: float, warmup: int,
        batches: Iterator[list[int]], pad_id: int, optimizer: torch.optim.Optimizer, device=None,
        clip: float = 1.0, log_every: int = 50, name: str = "train", loss_fn=answer_loss,
        progress: bool | None = None) -> list[float]:
    """Train ``params`` of ``model`` for ``steps`` steps on ``encoded`` examples; returns the losses.

    The learning rate follows `lr_at`; gradients are clipped to ``clip``. The model is left in
    eval mode. ``progress``: a tqdm bar over the steps, named ``name`` (None: only on a terminal
    and for more than one step, as the scorer's bars)."""
    model.train()
    history: list[float] = []
    start = time.perf_counter()
    disable = (not progress) if progress is not None else (None if steps > 1 else True)
    for step in tqdm(range(steps), desc=name, unit="step", disable=disable):
        rows = next(batches)
        batch = collate([encoded[i] for i in rows], pad_id)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        history.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.4f (%.0fs)", name, step, steps, history[-1], time.perf_counter() - start)
    model.eval()
    return history
