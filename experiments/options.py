"""Every experiment's command-line options, in one light module (no torch import), so that
``mechprobe --help`` answers at once and all commands share defaults and vocabulary."""

from __future__ import annotations

import argparse

DEFAULT_DEFENSES = "sr_self_reminder,qr_caption,ni_image_gaussian,mo_finetune,act_steer,act_ablate"
DEMO_DEFENSES = ("sr_self_reminder,sr_adashield_s,sr_mmsafety,qr_caption,qr_caption_no_image,qr_intention,"
                 "qr_rewrite,ni_image_gaussian,ni_image_mask,ni_text_smooth,mo_finetune,act_steer,act_ablate")
DEFENSE_NAMES = ("sr_self_reminder, sr_adashield_s, sr_mmsafety, sr_custom, qr_caption, qr_caption_no_image, "
                 "qr_intention, qr_rewrite, ni_image_gaussian, ni_image_mask, ni_text_smooth, mo_finetune, "
                 "mo_checkpoint, act_steer, act_conditional_steer, act_ablate; ensembles 'a+b', 'a|b', 'a&b', 'a~b'")
MODEL_HELP = ("'toy' (default: the embedded trained toy), 'tiny-random' (random weights: pipeline checks only), "
              "or a llava-hf LLaVA-1.5 checkpoint dir / hub id")
# Options that change only the analysis or where results go, never a score (not part of a run's identity).
ANALYSIS_OPTIONS = ("n_boot", "seed", "out", "defenses", "weight", "ops", "scores", "folds", "overwrite", "verbose",
                    "func", "command")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 and negatives are refused, not read as "all" or "drop N")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def add_common(p: argparse.ArgumentParser, name: str, defenses: str | None = DEFAULT_DEFENSES) -> None:
    p.add_argument("--model", default="toy", help=MODEL_HELP)
    p.add_argument("--dataset", default="toy",
                   help="toy | mossbench:<dir> | mmsafetybench:<dir> | jsonl:<file> (several joined by ',')")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N queries (N >= 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--readout", default="first_token", choices=["first_token", "yes_no"])
    p.add_argument("--batch-size", type=positive_int, default=16, help="queries per forward and per shard")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=f"runs/{name}")
    p.add_argument("--overwrite", action="store_true",
                   help="start over instead of resuming (only an empty directory or a mechprobe run is cleared)")
    if defenses is not None:
        p.add_argument("--defenses", default=defenses, help=f"comma-separated defense names: {DEFENSE_NAMES}")


def demo(p):
    add_common(p, "demo", defenses=DEMO_DEFENSES)
    p.set_defaults(n_boot=500, batch_size=8)


def mechanisms(p):
    add_common(p, "mechanisms")


def ensembles(p):
    add_common(p, "ensembles", defenses="sr_self_reminder,qr_caption,mo_finetune")
    p.add_argument("--ops", default="+,|", help="ensemble operators to try")
    p.add_argument("--weight", type=unit_float, default=0.5, help="weight of safety against helpfulness, in [0, 1]")


def layerwise(p):
    add_common(p, "layerwise", defenses="sr_self_reminder,qr_caption,mo_finetune")
    p.add_argument("--scores", default="lens,diffmean,probe", help="any of lens,diffmean,probe")
    p.add_argument("--folds", type=positive_int, default=5)


def modality(p):
    add_common(p, "modality", defenses=None)


def generation_check(p):
    add_common(p, "generation_check", defenses=None)
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--phrases", default=None, help="'|'-separated refusal phrases (default: a standard list)")
