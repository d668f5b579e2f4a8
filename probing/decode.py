"""Greedy decoding with a static KV cache, each decode step replayed as one CUDA graph on a GPU.

On a GPU, transformers' `generate` is launch-bound at 7B: every decode step launches ~1000 small
kernels from Python, and its stopping check reads the device after each step. In the study's
caption generation (128 queries, 32 tokens, H200) the device was busy only 0.72-0.82 of the time
(docs/performance.md §2b). Here the prompt is prefilled as `generate` does, then one decode step
(forward, argmax, end-of-sequence bookkeeping) is captured once as a CUDA graph and replayed:
one launch per token, and a device read only every ``check_every`` steps to stop early.

The step reads and writes fixed buffers: the last token, its position, the 4-D attention mask
over the whole cache (one key switched on per step), the step counter, the finished flags and the
token table. transformers' `StaticCache` writes each step's keys and values in place at an index
it keeps on the device, which is what makes the step capturable.

Same tokens as `model.generate(..., cache_implementation="static")` (tests/test_decode.py, CPU,
float32, with the eager loop; the graph replays the same kernels). Against transformers' default
dynamic cache the attention reads the padded cache, so low-precision sums may round differently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .cuda_graphs import graph_obstacle, record, warm_up
from .errors import InputError
from .render import padded_position_ids

log = logging.getLogger(__name__)

__all__ = ["Decoded", "graph_obstacle", "greedy_decode", "greedy_obstacle"]

#: generation-config fields that make transformers' greedy `generate` change the logits or the
#: search, with the values that leave it plain (temperature, top_k, ... act only when sampling)
_NEUTRAL = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None, []), "suppress_tokens": (None, []), "begin_suppress_tokens": (None, []),
    "sequence_bias": (None, {}), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,), "watermarking_config": (None,),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "guidance_scale": (None, 1, 1.0),
    "num_beams": (None, 1), "num_return_sequences": (None, 1), "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
}


@dataclass
class Decoded:
    """What `greedy_decode` produced.

    tokens: ``[batch, steps]`` new token ids on the host; a row that ended holds ``pad_token_id``
        after its end-of-sequence token, as `generate` pads it (the end is seen every
        ``check_every`` steps, so a few more padded columns than `generate` returns may follow).
    graphed: whether the decode steps ran as a replayed CUDA graph.
    """

    tokens: torch.Tensor
    graphed: bool


def greedy_obstacle(generation_config) -> str | None:
    """Why `greedy_decode` would not give what transformers' ``generate(do_sample=False)`` gives
    under ``generation_config`` (a field that adds a logits processor or another search), or None.
    A checkpoint may ship, say, a repetition penalty; then `generate` is left to transformers."""
    for field, neutral in _NEUTRAL.items():
        value = getattr(generation_config, field, None)
        if value not in neutral:
            return f"the generation config sets {field}={value!r}"
    return None


def _eos_ids(model: nn.Module, eos_token_id: int | Iterable[int] | None) -> list[int]:
    if eos_token_id is None:
        config = getattr(model, "generation_config", None)
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.inference_mode()
def greedy_decode(model: nn.Module, inputs: dict[str, torch.Tensor], max_new_tokens: int, pad_token_id: int,
                  *, eos_token_id: int | Iterable[int] | None = None, graphs: bool = False,
                  check_every: int = 8) -> Decoded:
    """Greedy continuation of a left-padded batch, as `generate(do_sample=False)` with a static cache.

    inputs: ``input_ids`` / ``attention_mask`` ``[batch, seq]`` on the model's device, optionally
        ``position_ids`` (else counted from each row's first real token) and ``pixel_values``.
    eos_token_id: None takes the model's generation config.
    graphs: capture the decode step as a CUDA graph (the model must be on one CUDA device with no
        hooks, `graph_obstacle`); if capturing fails, the steps run eagerly, with a warning.
    check_every: decode steps between reads of whether every row has ended (each read waits for
        the device).
    """
    from transformers import StaticCache

    ids, mask2 = inputs["input_ids"], inputs["attention_mask"]
    batch, seq = ids.shape
    if not bool(mask2[:, -1].all()):  # one device read per batch
        raise InputError("greedy_decode needs left padding: some rows end in padding (set the tokenizer's "
                         "padding_side to 'left')")
    device = ids.device
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        position_ids = padded_position_ids(mask2)
    cache = StaticCache(config=model.config, max_cache_len=seq + max_new_tokens)
    eos = torch.tensor(_eos_ids(model, eos_token_id), dtype=torch.long, device=device)

    logits = model(input_ids=ids, pixel_values=inputs.get("pixel_values"), attention_mask=mask2,
                   position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    first = logits[:, -1].argmax(-1)
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    tokens[:, 0] = first
    finished = torch.isin(first, eos)
    if max_new_tokens == 1:
        return Decoded(tokens.cpu(), False)

    # The step's fixed buffers. The mask covers the whole cache: prompt keys as padded, the new
    # keys switched on one per step (index `write_at`); cache slots not yet written stay off.
    last = ids.new_empty((batch, 1)).copy_(first[:, None])
    position = position_ids[:, -1:] + 1
    mask = torch.zeros((batch, 1, 1, seq + max_new_tokens), dtype=torch.bool, device=device)
    mask[:, 0, 0, :seq] = mask2.bool()
    write_at = torch.tensor([seq], device=device)
    step_at = torch.tensor([1], device=device)

    def step() -> None:
        mask.index_fill_(3, write_at, True)
        out = model(input_ids=last, attention_mask=mask, position_ids=position, cache=cache, use_cache=True,
                    logits_to_keep=1).logits
        new = out[:, -1].argmax(-1).masked_fill_(finished, pad_token_id)
        finished.logical_or_(torch.isin(new, eos))
        tokens.index_copy_(1, step_at, new[:, None])
        last.copy_(new[:, None])
        position.add_(1)
        write_at.add_(1)
        step_at.add_(1)

    run, graphed = step, False
    done = 1
    if graphs and max_new_tokens > 2:  # (with two tokens the warm-up step would be the only one)
        warm_up(step, device)  # the first decode step, for real
        done = 2
        try:
            graph, _ = record(step)
            run, graphed = graph.replay, True
        except Exception as exc:  # noqa: BLE001 - a failed capture leaves the eager step usable
            log.warning("decode steps run without a CUDA graph: capturing failed (%s: %s)", type(exc).__name__, exc)
    while done < max_new_tokens:
        if done % check_every == 0 and bool(finished.all()):
            break
        run()
        done += 1
    return Decoded(tokens[:, :done].cpu(), graphed)
