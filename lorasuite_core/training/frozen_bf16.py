"""Frozen base weights held in bf16 while a bf16-autocast training loop runs -- the same numbers, half the memory.

Under ``torch.autocast(dtype=bfloat16)`` every ``nn.Linear`` of the frozen base multiplies ``bf16(x) @ bf16(W)^T``:
autocast rounds the float32 weight ``W`` to bf16 on every forward pass, and autograd keeps that rounded copy for the
backward pass (the gradient of the input needs ``W``).  So a training step over a model of ``P`` linear parameters
holds ``4P`` bytes of float32 weights *and* ``2P`` bytes of their bf16 copies, besides the activations: for a 1.5B
student, ≈ 5.2 GB + 2.6 GB.

:func:`bf16_frozen_linears` stores such a weight as ``bf16(W)`` for the duration of the loop instead.  Autocast then
has nothing to round (the cast of a bf16 tensor to bf16 is the tensor itself) and autograd keeps a reference, not a
copy: ``2P`` bytes in all.  The products are the same: autocast would have computed ``bf16(W)`` anyway, with the same
round-to-nearest-even, so the loss, every gradient and the trained adapter are bit for bit those of the float32
weights (tested).

A distillation's teacher runs inside the same loop (its logits for the KL term, under autocast and without
gradients): the loop holds its weights the same way (``finetune_examples(frozen=...)``), which saves its float32
copy, ``2P`` bytes of the teacher's ``P``.

Which weights (each rule keeps that identity):

* frozen (``requires_grad`` False) ``nn.Linear`` weights and biases; the trainable adapter tensors stay float32;
* not a weight tied to an ``nn.Embedding`` (a tied LM head): the embedding's output would become bf16 and with it
  the residual stream, which autocast keeps in float32;
* not the base layer of a DoRA module, whose weight norm reads the base weight outside the matrix product.

Only *lossless* weights: ``float32(bf16(W)) == W``, as for every checkpoint released in bf16 and loaded in float32
(the case where the float32 weights are the process's own memory).  They are given back exactly when the loop ends,
and for a while by :meth:`Bf16Weights.float32` (the per-epoch scoring of early stopping decodes greedily without
autocast, in float32), so nothing outside the loop sees a difference.  Other weights stay float32: a float32
checkpoint, or one dequantised from GGUF as ``lorasuite models fetch`` writes them, whose tensors transformers maps
from the file (clean, shared page cache) -- a bf16 copy would add memory there, not save it.

Measured (``benchmarks/FROZEN_BF16_MEMORY.md``): three LoRA steps on Qwen2.5-Coder-1.5B saved in bf16, the training
loop's peak 12.89 GB without, 9.63 GB with (the process peak 12.89 → 11.13 GB, now set by loading the checkpoint into
float32); the same losses and adapter to the bit.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch

from lorasuite_core.io.memory import release_freed_memory

logger = logging.getLogger(__name__)


#: Elements per chunk of the lossless check (its temporaries stay at 16 MB, not a copy of the tensor).
CHECK_CHUNK = 1 << 22


def _lossless(tensor: torch.Tensor) -> bool:
    """``float32(bf16(W)) == W``: a float32 is a bf16 value exactly when the low 16 bits of its pattern are 0."""
    flat = tensor.detach().reshape(-1)
    return all(not (chunk.view(torch.int32) & 0xFFFF).any() for chunk in flat.split(CHECK_CHUNK))


def _dora_bases(model: torch.nn.Module) -> set[int]:
    """ids of the base layers of DoRA modules (PEFT LoRA layers whose ``use_dora`` is set for any adapter)."""
    bases = set()
    for module in model.modules():
        use_dora = getattr(module, "use_dora", None)
        if isinstance(use_dora, dict) and any(use_dora.values()) and hasattr(module, "get_base_layer"):
            bases.add(id(module.get_base_layer()))
    return bases


def frozen_linear_tensors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The tensors the module docstring's rules allow to hold in bf16 (each once)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    dora = _dora_bases(model)
    chosen: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or id(module) in dora:
            continue
        for tensor in (module.weight, module.bias):
            if (tensor is not None and not tensor.requires_grad and id(tensor) not in tied
                    and id(tensor) not in chosen and tensor.dtype == torch.float32
                    and _lossless(tensor.data)):
                chosen[id(tensor)] = tensor
    return list(chosen.values())


@dataclass
class Bf16Weights:
    """The tensors held in bf16 (see :func:`bf16_frozen_linears`)."""

    tensors: list[torch.nn.Parameter] = field(default_factory=list)

    def _cast(self, dtype: torch.dtype) -> None:
        for tensor in self.tensors:
            tensor.data = tensor.data.to(dtype)

    def restore(self) -> None:
        self._cast(torch.float32)

    @contextlib.contextmanager
    def float32(self) -> Iterator[None]:
        """Every weight float32 (exactly the original) inside the block, bf16 again after it."""
        self._cast(torch.float32)
        try:
            yield
        finally:
            self._cast(torch.bfloat16)


@contextlib.contextmanager
def bf16_frozen_linears(model: torch.nn.Module, mixed: torch.dtype | None) -> Iterator[Bf16Weights]:
    """Hold the lossless frozen linear weights of ``model`` in bf16 inside the block when ``mixed`` is bf16 (else
    nothing); they are float32 again, exactly, after it."""
    held = Bf16Weights(frozen_linear_tensors(model) if mixed == torch.bfloat16 else [])
    if held.tensors:
        logger.debug("holding %d frozen linear tensors (%.2f GB in float32) in bf16 for bf16-autocast training",
                     len(held.tensors), sum(t.numel() for t in held.tensors) * 4 / 1e9)
    held._cast(torch.bfloat16)
    if held.tensors:
        release_freed_memory()      # the float32 tensors' heap pages (module docstring of lorasuite_core.io.memory)
    try:
        yield held
    finally:
        held.restore()
