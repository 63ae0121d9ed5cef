"""The adapter-variant interface: what differs between PEFT's LoRA methods, behind one class.

Every variant is read into one factor form, :class:`LoraFactors`: PEFT's delta
``ΔW = scaling · B A`` (r × in ``A``, out × r ``B``), plus DoRA's magnitude vector.  A variant
says how its adapter is recognised (``matches``, from ``adapter_config.json``), which tensors each
module holds (``parts``: ``lora_<part>``), how one module's tensors become factors
(``read_module``), which rank fields the written config carries (``rank_config``), how the
transfer treats it (``svd_form``: re-factorise to PEFT's SVD form; ``has_magnitude``: carry the
effective change and fit the magnitude) and which fresh adapter the vanilla baseline trains
(``baseline_rank``, ``baseline_use_dora``).  One module per variant (``lora``, ``dora``,
``adalora``); the registry is :mod:`lorasuite_core.models.variants`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lorasuite_core.models.families import Family


@dataclass(frozen=True)
class LoraFactors:
    A: torch.Tensor      # r × in
    B: torch.Tensor      # out × r
    scaling: float       # PEFT's alpha / r (or alpha / sqrt(r) with rsLoRA; AdaLoRA alpha / (init_r + 1e-5))
    alpha: float
    magnitude: torch.Tensor | None = None   # DoRA's lora_magnitude_vector (out,), float64

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B.double() @ self.A.double())


def config_peft_type(config: dict[str, Any]) -> str:
    return str(config.get("peft_type", "")).upper()


class AdapterVariant:
    """One PEFT method.  Subclasses set the class attributes and implement the methods."""

    name: str                      # in the migration report: "lora", "dora", "adalora"
    label: str                     # in messages: "LoRA", ...
    peft_type: str                 # adapter_config.json's peft_type
    parts: frozenset[str]          # the tensors of one module, lora_<part>
    svd_form: bool = False         # ΔW = c P diag(E) Q: re-factorise with singular values (refactor.py)
    has_magnitude: bool = False    # DoRA: carry the effective change, fit the new magnitude (transfer/dora.py)
    baseline_use_dora: bool = False  # the vanilla baseline trains a fresh DoRA

    def matches(self, config: dict[str, Any]) -> bool:
        raise NotImplementedError

    def check_config(self, config: dict[str, Any], uri: str) -> None:
        """Raise on a config of this variant that PEFT cannot build."""

    def read_module(self, A: torch.Tensor, B: torch.Tensor, parts: dict[str, torch.Tensor], config: dict[str, Any],
                    module: str, uri: str) -> LoraFactors | None:
        """One module's factors from its tensors (``A``, ``B`` in float64); None when it carries nothing."""
        raise NotImplementedError

    def rank_config(self, config: dict[str, Any], family: Family, modules: Sequence[Any]) -> dict[str, Any]:
        """The rank fields of the written adapter_config.json for the migrated ``modules`` (each with
        ``layer``, ``name``, ``rank``, ``alpha``)."""
        raise NotImplementedError

    def check_rank(self, module: str, rank: int, config: dict[str, Any], uri: str) -> None:
        """The tensors' rank is the one the config declares (PEFT would build other shapes and refuse to load):
        ``rank_pattern``'s entry for the module, else ``r``."""
        from peft.utils.other import get_pattern_key

        from lorasuite_core.errors import LorasuiteError

        patterns = config.get("rank_pattern") or {}
        declared = patterns.get(get_pattern_key(list(patterns), module), config.get("r"))
        if not isinstance(declared, int) or isinstance(declared, bool) or declared != rank:
            raise LorasuiteError(f"adapter {uri}: {module} has rank {rank} in its tensors but adapter_config.json "
                                 f"says r = {declared}")

    def baseline_rank(self, config: dict[str, Any]) -> int:
        """The rank of the fresh adapter the vanilla baseline trains."""
        return int(config.get("r", 8))

    def __repr__(self) -> str:
        return f"<adapter variant {self.name}>"
