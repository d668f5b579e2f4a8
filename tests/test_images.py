"""How non-square images are made square: LLaVA-1.5's "pad" (the default) against llava-hf's "crop".

The reference for "pad" is written here from LLaVA-1.5's own recipe (paste the image centred on a
square of the image-mean colour, then the CLIP processor as shipped), independently of the
transformers class mechprobe uses for it."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from probing import Query, RefusalScorer, load_model
from probing.errors import InputError
from probing.images import IMAGE_ASPECT_RATIOS, image_aspect_ratio, set_image_aspect_ratio
from probing.model import model_fingerprint
from probing.pipeline import process_image

SIZES = [(1024, 180), (300, 457), (336, 336), (401, 400), (64, 1000)]


def square_on_mean(image: Image.Image, mean) -> Image.Image:
    """LLaVA-1.5's recipe: the image centred on a square canvas of the image-mean colour."""
    w, h = image.size
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def picture(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def cropping(llava_assets):
    return load_model("tiny-random", seed=0, image_aspect_ratio="crop")


@pytest.mark.parametrize("size", SIZES)
def test_pad_equals_llava_recipe(tiny, processor, size):
    """The default processes an image as LLaVA-1.5 does, exactly (uint8 canvas, same resize)."""
    image = picture(size)
    assert tiny.image_aspect_ratio == "pad"
    want = processor.image_processor([square_on_mean(image, processor.image_processor.image_mean)],
                                     return_tensors="pt")["pixel_values"][0]
    got = process_image(tiny, image)
    assert got.shape == want.shape == (3, 336, 336)
    assert torch.equal(got, want), f"{size}: max |diff| {(got - want).abs().max():.3g}"
    # the processor call the scorer's encode makes follows it too
    inputs = tiny.processor(text=["USER: <image>\nhi ASSISTANT:"], images=[image], return_tensors="pt")
    assert torch.equal(inputs["pixel_values"][0], want)


@pytest.mark.parametrize("size", SIZES)
def test_crop_is_the_processor_as_shipped(cropping, processor, size):
    image = picture(size, seed=1)
    want = processor.image_processor([image], return_tensors="pt")["pixel_values"][0]
    assert cropping.image_aspect_ratio == "crop"
    assert torch.equal(process_image(cropping, image), want)


def test_pad_keeps_the_ends_of_a_wide_image_that_crop_cuts_off(tiny, cropping):
    """A typography-like strip (1024 x 180) with marks at both ends: only "pad" shows them."""
    strip = np.full((180, 1024, 3), 255, dtype=np.uint8)
    strip[60:120, 10:90] = (255, 0, 0)     # a red mark at the left end
    strip[60:120, 934:1014] = (255, 0, 0)  # and one at the right end
    image = Image.fromarray(strip)

    def red(pixels):  # pixels much redder than green, back in 0-1 colour
        return int(((pixels[0] - pixels[1]) > 3.0).sum())

    assert red(process_image(tiny, image)) > 100
    assert red(process_image(cropping, image)) == 0


def test_square_images_are_unchanged(tiny, cropping):
    image = picture((500, 500), seed=2)
    assert torch.equal(process_image(tiny, image), process_image(cropping, image))


def test_scores_with_pad_equal_scores_of_the_padded_image_under_crop(tiny, cropping):
    """End to end: the default's margins are those of LLaVA-1.5's padded image fed to the shipped
    processor (same weights: both models are tiny-random seed 0)."""
    mean = cropping.processor.image_processor.image_mean
    images = [picture(s, seed=i) for i, s in enumerate(SIZES)]
    queries = [Query(f"q{i}", "What is in the image?", image=im, label="benign") for i, im in enumerate(images)]
    padded = [Query(q.id, q.text, image=square_on_mean(q.image, mean), label=q.label) for q in queries]
    got = RefusalScorer(tiny, progress=False).score(queries).margin
    want = RefusalScorer(cropping, progress=False).score(padded).margin
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    plain = RefusalScorer(cropping, progress=False).score(queries).margin
    assert (got - plain).abs().max() > 1e-4  # and the setting matters for these images


def test_setting_is_checked_and_switchable(processor):
    import copy

    with pytest.raises(InputError, match="image_aspect_ratio must be one of pad, crop, got 'square'"):
        load_model("tiny-random", image_aspect_ratio="square")
    proc = copy.deepcopy(processor)
    assert image_aspect_ratio(proc) == "crop"
    set_image_aspect_ratio(proc, "pad")
    assert image_aspect_ratio(proc) == "pad"
    set_image_aspect_ratio(proc, "crop")
    assert image_aspect_ratio(proc) == "crop"
    image = picture((300, 200))
    assert torch.equal(proc.image_processor([image], return_tensors="pt")["pixel_values"],
                       processor.image_processor([image], return_tensors="pt")["pixel_values"])


def test_setting_is_part_of_every_run_identity(llava_assets):
    from experiments import options
    from experiments.study_config import build

    assert options.IMAGE_ASPECT_RATIOS == IMAGE_ASPECT_RATIOS
    pad, crop = (model_fingerprint("tiny-random", image_aspect_ratio=v) for v in ("pad", "crop"))
    assert pad["image_aspect_ratio"] == "pad" and crop["image_aspect_ratio"] == "crop"
    assert build({}).image_aspect_ratio == "pad"
    with pytest.raises(InputError, match="study.toml: image_aspect_ratio must be 'pad' or 'crop', got 'fit'"):
        build({"image_aspect_ratio": "fit"}, "study.toml")


def test_a_run_made_with_another_setting_is_not_resumed(llava_assets, tmp_path, capsys):
    from experiments.cli import main

    out = tmp_path / "run"
    args = ["mechanisms", "--model", "tiny-random", "--limit", "8", "--defenses", "sr_self_reminder",
            "--n-boot", "10", "--out", str(out)]
    assert main([*args, "--image-aspect-ratio", "crop"]) == 0
    assert json.loads((out / "config.json").read_text())["fingerprint"]["image_aspect_ratio"] == "crop"
    capsys.readouterr()
    assert main(args) == 2
    assert "differs in: ['image_aspect_ratio']" in capsys.readouterr().err


def test_saved_and_checkpoint_models_keep_the_setting(cropping, tmp_path):
    from defenses import mo_checkpoint
    from defenses.finetune import FineTune
    from experiments.kept import SavedModel

    for lora in (True, False):  # adapters applied to the run's model; a whole model saved
        tune = FineTune(params={"steps": 1, "lora": lora}, steps=1, batch_size=2, lora=lora)
        folder = tmp_path / f"mo-{lora}"
        SavedModel(inner=tune, folder=folder, base_name=cropping.name).model(cropping)
        again = SavedModel(inner=tune, folder=folder, base_name=cropping.name).model(cropping)  # from disk
        assert again.image_aspect_ratio == "crop"
    assert mo_checkpoint(str(tmp_path / "mo-False")).model(cropping).image_aspect_ratio == "crop"
