"""Train the embedded toy model deterministically on the synthetic safety set.

    python -m probing.toy.train --seed 0            # regenerates probing/toy/weights/

Three stages, as LLaVA builds on a pretrained vision encoder:
1. vision pre-training: the CLIP tower learns to recognise the key phrase of typography cards
   and pictures (a linear head on mean-pooled features of the layer LLaVA reads, discarded after);
2. instruction tuning of the whole model: next-token loss on the answer tokens only;
3. occlusion invariance of the vision tower alone: an image with a few 14 px cells greyed gets
   the features its clean version gets (the stage-2 tower is the teacher), as a vision encoder
   pretrained on varied images is not thrown by a few blanked patches. The language model and
   projector are not touched, so what stage 2 taught about text is kept as it is.
Plain PyTorch, AdamW, linear warm-up then cosine decay. Same seed, same thread count, same
machine type -> the same bits.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import torch

from ..datasets import toy as data
from ..training import causal_lm_loss, encode_example, fit, length_grouped_batches, lr_at
from .build import build_untrained

logger = logging.getLogger(__name__)
from . import WEIGHTS_DIR  # noqa: E402


def _phrases() -> list[str]:
    """Every activity's key phrase, harmful then benign per pair (the vision stages' classes)."""
    return [p for _, h, b in data.PAIRS for p in (h, b)]


def _tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower's patch features at the layer LLaVA reads: ``[images, patches, d_vision]``."""
    out = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def pretrain_vision(model, processor, seed: int = 0, steps: int = 600, batch_size: int = 64,
                    lr: float = 3e-3, renders: int = 100, log_every: int = 100,
                    mask_share: float = 0.0) -> list[float]:
    """Stage 1: phrase recognition for the vision tower on freshly rendered train-split images
    (``mask_share`` of them with a few cells greyed, `data.occlude`)."""
    phrases = _phrases()
    rng = random.Random(f"vision-{seed}")
    images, classes = [], []

    def masked(img):
        if mask_share and rng.random() < mask_share:
            return data.occlude(img, rng, rng.uniform(0.05, 0.2))
        return img

    for _ in range(renders):
        for i, phrase in enumerate(phrases):
            images += [masked(data.render_typography(phrase, rng, "train")),
                       masked(data.render_picture(phrase, rng, "train"))]
            classes += [i, i]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    classes = torch.tensor(classes)
    tower = model.model.vision_tower
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(phrases))

    def loss_of(rows):
        return torch.nn.functional.cross_entropy(head(_tower_features(model, pixels[rows]).mean(1)), classes[rows])

    return _train_tower(tower, [*tower.parameters(), *head.parameters()], loss_of, len(classes), seed=seed,
                        steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.01, log_every=log_every,
                        name="vision")


def _train_tower(tower, params, loss_of, n_rows: int, *, seed: int, steps: int, batch_size: int, lr: float,
                 weight_decay: float, log_every: int, name: str) -> list[float]:
    """The vision stages' loop: AdamW over ``params``, batches of rows drawn with replacement from
    a generator seeded with ``seed``, 20 warm-up steps then cosine; ``loss_of(rows)``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    tower.train()
    history = []
    for step in range(steps):
        rows = torch.randint(0, n_rows, (batch_size,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, 20)
        loss = loss_of(rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.4f", name, step, steps, history[-1])
    return history


def occlusion_invariance(model, processor, seed: int = 0, steps: int = 600, batch_size: int = 64,
                         lr: float = 1e-3, renders: int = 20, clean_weight: float = 3.0,
                         log_every: int = 100) -> list[float]:
    """Stage 3: the vision tower learns to map train-split images with 5-20% of their cells
    greyed (`data.occlude`) to the features it gave the clean image before this stage (computed
    once, the teacher), while keeping the clean images' features (weighted ``clean_weight``).
    Only the features of the layer LLaVA reads are matched; the loss is relative to their mean
    square. Everything but the tower stays frozen."""
    tower = model.model.vision_tower
    rng = random.Random(f"occlusion-{seed}")
    clean, occluded = [], []
    for _ in range(renders):
        for phrase in _phrases():
            for render in (data.render_typography, data.render_picture):
                img = render(phrase, rng, "train")
                clean.append(img)
                occluded.append(data.occlude(img, rng, rng.uniform(0.05, 0.2)))
    px_clean = processor.image_processor(clean, return_tensors="pt")["pixel_values"]
    px_occluded = processor.image_processor(occluded, return_tensors="pt")["pixel_values"]

    was_training = tower.training
    tower.eval()
    with torch.no_grad():
        target = torch.cat([_tower_features(model, px_clean[i:i + 256]) for i in range(0, len(px_clean), 256)])
    scale = target.pow(2).mean()
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(tower.parameters())
    for p in params:
        p.requires_grad_(True)

    def loss_of(rows):
        return ((_tower_features(model, px_occluded[rows]) - target[rows]).pow(2).mean()
                + clean_weight * (_tower_features(model, px_clean[rows]) - target[rows]).pow(2).mean()) / scale

    history = _train_tower(tower, params, loss_of, len(px_clean), seed=seed, steps=steps, batch_size=batch_size,
                           lr=lr, weight_decay=0.0, log_every=log_every, name="occlusion")
    for p, flag in flags.items():
        p.requires_grad_(flag)
    tower.train(was_training)
    return history


# The shipped weights' settings (`python -m probing.toy.train --seed 0`).
TRAIN_DEFAULTS = dict(steps=1400, batch_size=32, lr=2e-3, repeats=40, vision_steps=600, threads=1,
                      vision_mask_share=0.0, occlusion_share=0.0, occlusion_steps=600)


def train(seed: int = 0, steps: int = TRAIN_DEFAULTS["steps"], batch_size: int = TRAIN_DEFAULTS["batch_size"],
          lr: float = TRAIN_DEFAULTS["lr"], repeats: int = TRAIN_DEFAULTS["repeats"], warmup: int = 60,
          log_every: int = 50, progress: bool = True, vision_steps: int = TRAIN_DEFAULTS["vision_steps"],
          vision_renders: int = 100, vision_mask_share: float = TRAIN_DEFAULTS["vision_mask_share"],
          occlusion_share: float = TRAIN_DEFAULTS["occlusion_share"],
          occlusion_steps: int = TRAIN_DEFAULTS["occlusion_steps"]):
    """Train from scratch; returns (model, processor, history of losses)."""
    torch.manual_seed(seed)
    model, processor = build_untrained(seed)
    history = (pretrain_vision(model, processor, seed, vision_steps, renders=vision_renders,
                               mask_share=vision_mask_share) if vision_steps else [])
    examples = data.training_examples(seed, repeats=repeats, occlusion_share=occlusion_share)
    encoded = [encode_example(processor, e) for e in examples]
    logger.info("training on %d examples for %d steps", len(encoded), steps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    # The full-vocabulary HF loss (the toy's vocabulary is small, so it costs nothing here) keeps
    # the shipped weights reproducible bit for bit by this script.
    history += fit(model, list(model.parameters()), encoded, steps=steps, lr=lr, warmup=warmup,
                   batches=length_grouped_batches([len(x["input_ids"]) for x in encoded], batch_size,
                                                  random.Random(f"order-{seed}")),
                   pad_id=processor.tokenizer.pad_token_id, optimizer=opt, loss_fn=causal_lm_loss,
                   log_every=log_every if progress else 10**9, name="toy")
    if occlusion_steps:
        history += occlusion_invariance(model, processor, seed, occlusion_steps)
    return model, processor, history


def save(model, processor, out: Path = WEIGHTS_DIR) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=TRAIN_DEFAULTS["steps"])
    p.add_argument("--vision-steps", type=int, default=TRAIN_DEFAULTS["vision_steps"])
    p.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"])
    p.add_argument("--repeats", type=int, default=TRAIN_DEFAULTS["repeats"], help="copies of the request set")
    p.add_argument("--vision-mask-share", type=float, default=TRAIN_DEFAULTS["vision_mask_share"],
                   help="share of stage-1 images with a few cells greyed")
    p.add_argument("--occlusion-share", type=float, default=TRAIN_DEFAULTS["occlusion_share"],
                   help="share of instruction-tuning image requests with a few cells greyed")
    p.add_argument("--occlusion-steps", type=int, default=TRAIN_DEFAULTS["occlusion_steps"],
                   help="stage 3 steps (occlusion invariance of the vision tower; 0 skips it)")
    p.add_argument("--threads", type=int, default=TRAIN_DEFAULTS["threads"],
                   help="torch threads (the bits depend on it; 1 is fastest on a shared 2-core machine)")
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    p.add_argument("--no-eval", action="store_true", help="skip the behaviour report")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, processor, _ = train(args.seed, args.steps, args.batch_size, args.lr, args.repeats,
                                vision_steps=args.vision_steps, vision_mask_share=args.vision_mask_share,
                                occlusion_share=args.occlusion_share, occlusion_steps=args.occlusion_steps)
    out = save(model, processor, args.out)
    logger.info("trained in %.0fs, saved to %s", time.perf_counter() - start, out)
    if not args.no_eval:
        from ..model import load_model
        from .evaluate import behaviour, format_report

        logger.info("behaviour on the test split:\n%s", format_report(behaviour(load_model(str(out)))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
