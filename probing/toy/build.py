"""The toy's tokenizer, processor and (untrained) model, all built locally.

Same classes as LLaVA-1.5 (``LlavaForConditionalGeneration``, ``LlavaProcessor`` with a CLIP
image processor), the same chat-template style (``[system ]USER: <image>\\n{text} ASSISTANT:``),
small widths and 112 px images (64 image tokens) so it trains on a CPU in minutes.
"""

from __future__ import annotations

import torch

from ..datasets import toy as data

IMAGE_TOKEN, PAD, BOS, EOS, UNK = "<image>", "<pad>", "<s>", "</s>", "<unk>"

# Our own template with LLaVA-1.5's rendering: system text, then "USER: ", images, the user's
# text, then "ASSISTANT:" when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% elif m['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% else %}{{ 'ASSISTANT: ' }}{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

TEXT = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.04)
VISION = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
              image_size=data.IMAGE_SIZE, patch_size=14, projection_dim=96)

# The readouts' answer words, so each starts an answer as a single token.
READOUT_WORDS = "I Sorry As Unfortunately Sure Here The Yes To No Certainly"


def corpus(seed: int = 0) -> list[str]:
    """The tokenizer's training text: the toy's training corpus only (no defense or readout text),
    plus wordings sampled from its grammars so frequent words become whole tokens."""
    import random

    rng = random.Random(f"tokenizer-{seed}")
    texts = [READOUT_WORDS] * 50 + data.corpus() + ["USER: ASSISTANT:"] * 50
    for _ in range(400):
        texts += [data.safety_instruction(rng), data.neutral_text(rng), data.caption_question(rng),
                  data.yes_no_question(rng), data.intent_question(rng, ""), data.rewrite_question(rng, "")]
    for _, h, b in data.PAIRS:
        for p in (h, b):
            texts += [t.format(p=p) for t in data.TEMPLATES["train"]["text"]]
            texts += [f"ASSISTANT: {t.format(p=p)}" for t in data.REFUSALS + data.COMPLIANCE]
    return texts


def build_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE tokenizer trained on the toy corpus (any text encodes; no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS, PAD, IMAGE_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   padding_side="left")
    return fast


def build_processor():
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": data.IMAGE_SIZE}, crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE},
        do_center_crop=True, do_normalize=True, do_rescale=True, do_resize=True, do_convert_rgb=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=14,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          num_additional_image_tokens=1)


def build_config(processor):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = processor.tokenizer
    text = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **TEXT)
    vision = CLIPVisionConfig(**VISION)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                       pad_token_id=tok.pad_token_id, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       image_seq_length=(data.IMAGE_SIZE // 14) ** 2, tie_word_embeddings=False)


def build_untrained(seed: int = 0):
    """(model, processor) with seeded random weights."""
    from ..model import build_random_model

    processor = build_processor()
    model = build_random_model(build_config(processor), seed=seed, dtype=torch.float32)
    return model, processor
