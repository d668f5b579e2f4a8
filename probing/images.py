"""How a non-square image becomes the model's square input: LLaVA-1.5's "pad" or llava-hf's "crop".

LLaVA-1.5 was trained and evaluated with ``image_aspect_ratio = "pad"``: every image is padded to a
square with the image-mean colour before the CLIP processor resizes it, so the whole image reaches
the vision tower. The llava-hf checkpoints ship a ``CLIPImageProcessor`` that resizes the shortest
edge and crops the centre instead, which drops the sides of a wide image and the top and bottom of
a tall one. For the benchmarks that is not a detail: MM-SafetyBench's TYPO images (1024 x 180-360)
keep about a quarter of their typed phrase, and its SD_TYPO images lose the lower part of the
phrase under the picture. "pad" is therefore the default; "crop" reproduces the llava-hf processor
as shipped.

The setting lives in one place, the processor's image processor (``do_pad`` of transformers'
``LlavaImageProcessorPil``), so every path that turns an image into pixel values (scoring,
generation, fine-tuning) follows it, and `image_aspect_ratio` reads it back for fingerprints.
"""

from __future__ import annotations

from .errors import InputError

#: the values of ``image_aspect_ratio``: "pad" (LLaVA-1.5's own preprocessing) and "crop"
IMAGE_ASPECT_RATIOS = ("pad", "crop")
DEFAULT_IMAGE_ASPECT_RATIO = "pad"


def check_image_aspect_ratio(value, option: str = "image_aspect_ratio") -> str:
    """``value`` if it is one of `IMAGE_ASPECT_RATIOS`; otherwise an `InputError` naming ``option``."""
    if value not in IMAGE_ASPECT_RATIOS:
        raise InputError(f"{option} must be one of {', '.join(IMAGE_ASPECT_RATIOS)}, got {value!r}")
    return value


def image_aspect_ratio(processor) -> str:
    """"pad" when the processor pads images to a square before resizing them, else "crop"."""
    return "pad" if getattr(processor.image_processor, "do_pad", False) else "crop"


def set_image_aspect_ratio(processor, value: str) -> None:
    """Make ``processor`` pad (``"pad"``) or centre-crop (``"crop"``) non-square images, in place.

    For "pad", a processor that cannot pad (llava-hf's ``CLIPImageProcessor``) is replaced by
    transformers' LLaVA image processor of the same backend (``LlavaImageProcessorPil`` for PIL,
    ``LlavaImageProcessor`` for torchvision) with the same size, crop, resampling and
    normalisation and ``do_pad=True``: it pads with the image mean (as 0-255 integers, as LLaVA-1.5
    does), centred, then resizes and crops exactly as before; a square image is unchanged."""
    check_image_aspect_ratio(value)
    current = processor.image_processor
    if hasattr(type(current), "pad_to_square"):
        current.do_pad = value == "pad"
        return
    if value == "crop":
        return
    from transformers.image_processing_backends import PilBackend

    if isinstance(current, PilBackend):
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as padding
    else:  # the torchvision ("fast") backend, which AutoProcessor picks where torchvision is installed
        from transformers.models.llava.image_processing_llava import LlavaImageProcessor as padding
    settings = {k: v for k, v in current.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    processor.image_processor = padding(**settings, do_pad=True)
