"""Serving-ready outputs: what vLLM, LoRAX and TGI accept, checked at publish, and an exact export for vLLM.

:mod:`.engines` checks a PEFT adapter directory against each engine's loader (the result goes to
``migration_report.json`` under ``serving``); :mod:`.export` rewrites an adapter into the one form
every engine reads (``--serving vllm``) where that is exact.
"""
from .engines import ENGINES, VLLM_MAX_LORA_RANKS, check_serving, vllm_rank
from .export import export_plain_lora

__all__ = ["ENGINES", "VLLM_MAX_LORA_RANKS", "check_serving", "export_plain_lora", "vllm_rank"]
