"""Would vLLM, LoRAX or TGI serve this PEFT adapter, and give PEFT's outputs?

Each engine reads a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``) for the
base model it serves, but only a subset of what PEFT writes.  The constraints, with their sources:

vLLM (``vllm serve BASE --enable-lora --max-lora-rank R``):

* ``max_lora_rank`` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 and every adapter's ``r`` must
  be at most that (``MaxLoRARanks`` in https://github.com/vllm-project/vllm/blob/main/vllm/config/lora.py;
  the check ``r > max_lora_rank`` in ``PEFTHelper.validate_legal``,
  https://github.com/vllm-project/vllm/blob/main/vllm/lora/peft_helper.py).  Reported as the
  smallest allowed ``max_lora_rank`` that fits (:func:`vllm_rank`); above 512 nothing fits.
* ``modules_to_save`` must be empty: "vLLM only supports modules_to_save being None", and DoRA is
  refused: "vLLM does not yet support DoRA" (``PEFTHelper._validate_features``, same file; the
  loader also raises on ``use_dora`` and on magnitude vectors, ``LoRAModel.from_lora_tensors`` in
  https://github.com/vllm-project/vllm/blob/main/vllm/lora/lora_model.py).
* Every tensor must belong to a LoRA target module of the model; anything else (a full embedding or
  ``lm_head`` weight saved by ``modules_to_save`` / ``save_embedding_layers``) is an "unexpected
  module" and refused (``check_unexpected_modules`` in ``LoRAModel.from_local_checkpoint``, same
  file); LoRA on embeddings (``lora_embedding_A/B``, extra vocabulary) is being phased out
  (``lora_extra_vocab_size`` deprecated in ``vllm/config/lora.py``).
* One scaling for the whole adapter: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
  ``use_rslora``), from the config's ``r`` and ``lora_alpha`` (``PEFTHelper.__post_init__``);
  ``rank_pattern`` / ``alpha_pattern`` are not read, so a module whose PEFT scaling differs would
  be served with the wrong one.

LoRAX (https://github.com/predibase/lorax, ``server/lorax_server/adapters/lora.py``) and TGI
(https://github.com/huggingface/text-generation-inference, ``server/text_generation_server/adapters/lora.py``,
derived from LoRAX's): the config is read with ``peft.LoraConfig`` (``r``, ``lora_alpha``,
``use_rslora``, ``target_modules``; no AdaLoRA), the weights by the names
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` only, scaled by
``get_scaling_factor(lora_alpha, r, use_rslora)``, and the per-layer matrices of one module type
are stacked (so one rank per module type).  Anything else — AdaLoRA's ``lora_E`` and unsuffixed
keys, DoRA's magnitude, ``modules_to_save`` weights — is not used, so the served model would differ
from PEFT's: reported as not servable.

:func:`check_serving` applies these rules to a directory and returns, per engine, ``servable`` and
the problems (and for vLLM the ``max_lora_rank`` to start it with).  :mod:`.export` rewrites an
adapter into the form all three read, where that is exact.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lorasuite_core.models.loading import LORA_KEY
from lorasuite_core.models.variants import variant_of
from lorasuite_core.models.variants.adalora import EPS as ADALORA_EPS, INIT_R as ADALORA_INIT_R
from lorasuite_core.models.variants.lora import alpha_for

ENGINES = ("vllm", "lorax", "tgi")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_LORA_PARTS = {"A", "B", "E", "magnitude_vector"}


def vllm_rank(rank: int) -> int | None:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank`` (None above 512)."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), None)


@dataclass
class AdapterLayout:
    """What an engine sees: the config, each LoRA module's parts and shapes, the other tensors."""

    config: dict[str, Any]
    variant: str                                               # lora | dora | adalora
    modules: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)   # module -> part -> shape
    keys: dict[str, dict[str, str]] = field(default_factory=dict)                   # module -> part -> key
    embedding_lora: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)              # non-LoRA tensors (full weights)

    def rank(self, module: str) -> int:
        return self.modules[module]["A"][0]

    def scaling(self, module: str) -> float:
        """PEFT's scaling of ``module`` (rank/alpha patterns, rsLoRA, AdaLoRA's alpha / (init_r + eps))."""
        r = self.rank(module)
        if self.variant == "adalora":
            alpha = float(self.config.get("lora_alpha") or 0)
            return (alpha if alpha > 0 else float(r)) / (int(self.config.get("init_r") or ADALORA_INIT_R) + ADALORA_EPS)
        alpha = alpha_for(module, self.config, r)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def read_layout(adapter_dir: str | Path) -> AdapterLayout:
    """The layout of a local PEFT adapter directory (tensor headers only; no values read)."""
    root = Path(adapter_dir)
    config = json.loads((root / "adapter_config.json").read_text())
    layout = AdapterLayout(config=config, variant=variant_of(config).name)
    with safe_open(root / "adapter_model.safetensors", framework="pt") as handle:
        for key in handle.keys():
            match = LORA_KEY.match(key)
            if "lora_embedding_" in key:
                layout.embedding_lora.append(key)
            elif match and match.group("ab") in _LORA_PARTS:
                module, part = match.group("module"), match.group("ab")
                layout.modules.setdefault(module, {})[part] = tuple(handle.get_slice(key).get_shape())
                layout.keys.setdefault(module, {})[part] = key
            else:
                layout.other.append(key)
    return layout


def _common_problems(layout: AdapterLayout) -> list[str]:
    """What none of the three engines serves as PEFT does."""
    problems = []
    if layout.variant == "adalora":
        problems.append("AdaLoRA (lora_E, SVD form): only plain LoRA lora_A/lora_B are read")
    if layout.variant == "dora":
        problems.append("DoRA (use_dora, magnitude vectors) is not served")
    if layout.config.get("modules_to_save"):
        problems.append(f"modules_to_save {layout.config['modules_to_save']} is not supported")
    if layout.other:
        problems.append(f"{len(layout.other)} non-LoRA weight(s) such as {layout.other[0]} (full embedding / "
                        "lm_head / saved modules) are not loaded")
    if layout.embedding_lora:
        problems.append(f"LoRA on embeddings ({layout.embedding_lora[0]}) is not supported")
    if layout.variant != "adalora" and layout.modules:
        r = layout.config.get("r")
        alpha = float(layout.config.get("lora_alpha") or r or 0)
        if isinstance(r, int) and r > 0:
            engine = alpha / math.sqrt(r) if layout.config.get("use_rslora") else alpha / r
            wrong = [m for m in layout.modules if not math.isclose(layout.scaling(m), engine, rel_tol=1e-6)]
            if wrong:
                problems.append(f"{len(wrong)} module(s) such as {wrong[0]} have another scaling (rank_pattern / "
                                f"alpha_pattern) than the one lora_alpha / r = {engine:g} the engines apply to all")
        ranks = {_module_type(m): set() for m in layout.modules}
        for module in layout.modules:
            ranks[_module_type(module)].add(layout.rank(module))
        mixed = sorted(kind for kind, seen in ranks.items() if len(seen) > 1)
        if mixed:
            problems.append(f"module type(s) {', '.join(mixed)} have several ranks; one rank per type is stacked")
    return problems


def _module_type(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (the layer index dropped)."""
    return re.sub(r"^.*?\.\d+\.", "", module)


def check_serving(adapter_dir: str | Path) -> dict[str, Any]:
    """Per engine (:data:`ENGINES`): ``{"servable": bool, "problems": [...]}``; vLLM also ``max_lora_rank``
    (the value to start it with, None when no allowed value holds the rank) and ``rank``."""
    layout = read_layout(adapter_dir)
    common = _common_problems(layout)
    rank = max((layout.rank(m) for m in layout.modules), default=0)
    vllm = list(common)
    needed = vllm_rank(rank)
    if needed is None:
        vllm.append(f"rank {rank} is above vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}")
    report: dict[str, Any] = {"vllm": {"servable": not vllm, "problems": vllm, "rank": rank, "max_lora_rank": needed}}
    for engine in ("lorax", "tgi"):
        report[engine] = {"servable": not common, "problems": list(common)}
    return report


def load_module_factors(adapter_dir: str | Path, layout: AdapterLayout) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per LoRA module ``(A, B, scaling)`` with ``ΔW = scaling · B A``; AdaLoRA's ``E`` folded into ``A``
    (``A = diag(E) P``, ``ΔW = α/(init_r + ε) · B diag(E) P``, as PEFT's SVD form computes it)."""
    factors = {}
    with safe_open(Path(adapter_dir) / "adapter_model.safetensors", framework="pt") as handle:
        for module, keys in layout.keys.items():
            A, B = handle.get_tensor(keys["A"]), handle.get_tensor(keys["B"])
            if layout.variant == "adalora":
                A = handle.get_tensor(keys["E"]).reshape(-1, 1).to(A.dtype) * A
            factors[module] = (A, B, layout.scaling(module))
    return factors


