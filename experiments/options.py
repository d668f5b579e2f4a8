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
#: `probing.images.IMAGE_ASPECT_RATIOS`, repeated here because this module imports no torch
IMAGE_ASPECT_RATIOS = ("pad", "crop")
ASPECT_HELP = ("pad (default): each image padded to a square with its mean colour, as LLaVA-1.5 was trained and "
               "evaluated; crop: the llava-hf processor as shipped, whose centre crop cuts off the sides of wide "
               "images (most of MM-SafetyBench's typography) and the top and bottom of tall ones")
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


def layer_spec(text: str) -> str:
    """argparse type of `mechprobe score --layers`: 'all', 'none' or comma-separated layer indices
    (negative ones count from the last layer). Returns the text as given (it is recorded in the
    run's settings); a bad index is refused here, before the model loads."""
    if text in ("all", "none"):
        return text
    for part in text.split(","):
        try:
            int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'all', 'none' or comma-separated layer indices "
                                             f"(e.g. 0,2,-1), got {text!r}") from None
    return text


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
                   help="toy | mossbench:<dir> | mmsafetybench:<dir> (tiny subset, SD_TYPO) | jsonl:<file> "
                        "(several joined by ',')")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="the first N queries of each dataset (N >= 1), stratified by label")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--image-aspect-ratio", default="pad", choices=list(IMAGE_ASPECT_RATIOS), help=ASPECT_HELP)
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
    p.add_argument("--ensembles", default=None,
                   help="comma-separated ensemble expressions (default: sr_self_reminder+mo_finetune and "
                        "qr_caption_no_image|sr_self_reminder, those whose members are in --defenses)")
    p.add_argument("--generation-check", type=int, default=16,
                   help="queries answered greedily to cross-check the readout (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per answer in the generation check")
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


def study(p):
    """`mechprobe study`: every flag left out keeps the config file's value (or the default)."""
    p.add_argument("--config", default=None, help="a study TOML file (see examples/study.toml, docs/quickstart.md)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--out", default=None, help="run directory (default runs/study)")
    p.add_argument("--defenses", default=None, help=f"comma-separated defense names: {DEFENSE_NAMES}")
    p.add_argument("--ensembles", default=None,
                   help="comma-separated ensemble expressions, e.g. 'sr_self_reminder+mo_finetune,qr_caption|sr_mmsafety'")
    p.add_argument("--dataset", action="append", default=None,
                   help="repeatable: toy | mossbench:<dir> | mmsafetybench:<dir> (tiny subset, SD_TYPO) | jsonl:<file>")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="the first N queries of each dataset (N >= 1), stratified by label")
    p.add_argument("--prompt-format", default=None, choices=["hf", "llava_v1"],
                   help="hf: the llava-hf chat template; llava_v1: the original repository's default system prompt")
    p.add_argument("--prompts", default=None, help="a TOML/JSON file of published defense wordings (docs/defenses.md)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16")
    p.add_argument("--compile", action="store_true", default=None,
                   help="compile the language model (torch.compile): faster forwards on a GPU after a one-off "
                        "compilation; margins agree to ~1e-6, not bit for bit (docs/performance.md §2)")
    p.add_argument("--image-aspect-ratio", default=None, choices=list(IMAGE_ASPECT_RATIOS), help=ASPECT_HELP)
    p.add_argument("--readout", default=None, choices=["first_token", "yes_no"])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--weight", type=float, default=None, help="weight of safety against helpfulness (default 0.5)")
    p.add_argument("--generation-check", type=int, default=None,
                   help="queries answered greedily to cross-check the readout (default 16; 0: off)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer in the generation check")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
