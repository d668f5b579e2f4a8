"""The attention mask a forward hands the language model, prepared so that no device sync is
needed to use it.

Given a 2-D padding mask, transformers' SDPA path first asks whether any position is padded
(``padding_mask.sum() == numel``, read on the host; `masking_utils._ignore_causal_mask_sdpa`).
On a GPU that read waits for everything queued, so every scoring forward drained the device.
Whether a batch is padded is known on the host before it is moved (the prefetch worker reads
its CPU mask), so a padded batch gets, ready made, the 4-D mask transformers would build from it:
boolean ``[batch, 1, seq, seq]``, query q sees key k when k <= q and k is real. transformers
passes a 4-D mask through unchanged, so attention gets the same tensor as before (the same
bits, tests/test_attention_mask.py). An unpadded batch keeps its 2-D mask: transformers then
uses no mask at all (SDPA's causal flag) after one device read, which this cannot avoid without
changing the kernel SDPA picks.
"""

from __future__ import annotations

import torch
from torch import nn


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` 0/1 padding mask -> ``[batch, 1, seq, seq]`` boolean causal mask, what
    `transformers.masking_utils.sdpa_mask` builds for a forward without a cache."""
    seq = attention_mask.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril_()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def model_attention_mask(language_model: nn.Module, attention_mask: torch.Tensor, padded: bool) -> torch.Tensor:
    """What a forward without a cache passes as ``attention_mask``: for a ``padded`` batch (known
    on the host) into a language model that attends through SDPA, the ready 4-D mask; otherwise
    the 2-D mask as it is (other attention paths build their masks without reading the device)."""
    if padded and getattr(language_model.config, "_attn_implementation", None) == "sdpa":
        return causal_padding_mask(attention_mask)
    return attention_mask
