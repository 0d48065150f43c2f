"""Output preservation: keep what the model drew for the words a LoRA's captions share with everything else.

A LoRA trained on a handful of captioned images ("red bar", "green bar") learns the new word, and with it the easy
shortcut of drawing the new concept for *every* caption: "red circle" comes out as a bar too, because nothing in the
data says otherwise. ai-toolkit's Differential Output Preservation says otherwise without extra images: each training
caption with its trigger word replaced by a class word ("red bar" -> "red circle") is run through the model with
and without the LoRA on the same noisy latent and sigma, and the LoRA is penalised for any difference:

    loss = task loss + weight * w(sigma) * | v_lora(x_t, class caption) - v_frozen(x_t, class caption) |^2

`v_frozen` is the model as it is trained without the trainable LoRA (the base; with scheme 'differential' the base
plus its frozen adapter). Here the trigger may be replaced by any of several class words (one drawn per sample
and step), so a colour LoRA can keep every other colour. Captions without the trigger are not preserved (their own
image is the target there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class Preservation:
    """The class captions of a dataset's captions: `trigger` (a whole word, case-insensitive) replaced by each of
    `classes` in turn."""

    def __init__(self, trigger: str, classes: Sequence[str]):
        self.trigger, self.classes = trigger, tuple(classes)
        self.pattern = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE)

    def applies(self, caption: str) -> bool:
        return self.pattern.search(caption) is not None

    def caption(self, caption: str, class_index: int) -> str:
        """`caption` with every occurrence of the trigger replaced by class `class_index`."""
        return self.pattern.sub(lambda _: self.classes[class_index], caption)

    def all_captions(self, captions: Sequence[str]) -> list[str]:
        """Every class caption the run can draw (to encode once before training), in a stable order."""
        out = [self.caption(c, k) for c in captions if self.applies(c) for k in range(len(self.classes))]
        return list(dict.fromkeys(out))


def preservation_prompts(config, dataset_dir) -> list[str]:
    """Every class caption a run of `config` (a TrainConfig) on the dataset folder will need, to encode with the
    dataset: the headless trainer has no text encoder to make them. [] with preservation off."""
    from .data import scan_dataset

    if config.preservation_weight <= 0:
        return []
    items, _ = scan_dataset(dataset_dir)
    return Preservation(config.preservation_trigger, config.preservation_classes).all_captions(
        [item.caption for item in items])
