"""Adapter variants (LoRA, DoRA, AdaLoRA), one module each behind :class:`~.base.AdapterVariant`, and
their registry.

Adding a PEFT method: a module with an :class:`~.base.AdapterVariant` subclass, listed in
:data:`VARIANTS`; loading, writing, the transfer and the vanilla baseline ask the variant.
"""
from __future__ import annotations

from typing import Any

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.variants.adalora import ADALORA
from lorasuite_core.models.variants.base import AdapterVariant
from lorasuite_core.models.variants.dora import DORA
from lorasuite_core.models.variants.lora import LORA

#: name -> variant, in the order messages list them
VARIANTS: dict[str, AdapterVariant] = {v.name: v for v in (LORA, DORA, ADALORA)}

__all__ = ["VARIANTS", "variant_of", "supported_labels"]


def variant_of(config: dict[str, Any]) -> AdapterVariant:
    """The variant an ``adapter_config.json`` describes (the variants' ``matches`` are disjoint)."""
    for variant in VARIANTS.values():
        if variant.matches(config):
            return variant
    raise LorasuiteError(f"adapter config matches no adapter variant ({supported_labels()})")  # pragma: no cover


def supported_labels() -> str:
    """``"LoRA, DoRA or AdaLoRA"``."""
    labels = [v.label for v in VARIANTS.values()]
    return ", ".join(labels[:-1]) + " or " + labels[-1]
