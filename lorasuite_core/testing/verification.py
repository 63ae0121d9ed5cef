"""Checking a migration against an upgrade's ground truth: old model (+ adapter) vs upgraded model (+ adapter).

``logits_over_shared_vocab`` feeds the old token ids to the old model and the *mapped* ids
(``token_map`` from ``new_dir/lorasuite_upgrade.json``) to the new model, and returns both logits
restricted to the old vocabulary (new columns taken at ``token_map[old id]``), so that for a
function-preserving upgrade ``relative_max_error(old, new)`` is ~1e-6 in float32.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

GROUND_TRUTH_FILE = "lorasuite_upgrade.json"


def load_token_map(new_dir) -> dict[int, int] | None:
    """``{old id: new id}`` from ``new_dir/lorasuite_upgrade.json`` (None if the file is absent)."""
    path = Path(new_dir) / GROUND_TRUTH_FILE
    if not path.exists():
        return None
    truth = json.loads(path.read_text(encoding="utf-8"))
    return {int(k): int(v) for k, v in truth["token_map"].items()}


def load_model(model_dir, adapter=None):
    """AutoModelForCausalLM in float32 / eval / eager attention, optionally wrapped with a PEFT adapter."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if adapter is not None:
        from peft import PeftModel

        with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
            warnings.filterwarnings("ignore", category=FutureWarning)
            model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


@torch.no_grad()
def sequence_logits(model, token_ids: list[list[int]]) -> Tensor:
    """Logits of every sequence (each run on its own, no padding), concatenated: ``[sum(len), vocab]``."""
    outs = []
    for seq in token_ids:
        ids = torch.tensor([list(seq)], dtype=torch.long)
        outs.append(model(input_ids=ids).logits[0].float())
    return torch.cat(outs, dim=0)


def logits_over_shared_vocab(
    old_dir,
    new_dir,
    token_ids: list[list[int]],
    old_adapter=None,
    new_adapter=None,
    token_map: dict[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Old-model logits on ``token_ids`` and new-model logits on the mapped ids, over the old vocab.

    Returns ``(old, new)``, both ``[sum of sequence lengths, old vocab size]`` float32; row ``t`` of
    ``new`` holds the new model's logits at columns ``token_map[0..V_old-1]``.  ``token_map`` defaults
    to the one in ``new_dir/lorasuite_upgrade.json`` (identity if that file does not exist).
    """
    if token_map is None:
        token_map = load_token_map(new_dir)
    old_model = load_model(old_dir, old_adapter)
    old = sequence_logits(old_model, token_ids)
    del old_model
    v_old = old.shape[-1]
    if token_map is None:
        token_map = {i: i for i in range(v_old)}
    missing = [i for i in range(v_old) if i not in token_map]
    if missing:
        raise ValueError(f"token_map has no entry for old ids {missing[:10]}")
    new_model = load_model(new_dir, new_adapter)
    mapped = [[token_map[int(t)] for t in seq] for seq in token_ids]
    new = sequence_logits(new_model, mapped)
    cols = torch.tensor([token_map[i] for i in range(v_old)], dtype=torch.long)
    return old, new[:, cols]


def relative_max_error(a, b) -> float:
    """``max|a - b| / max|a|``."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    denom = a.abs().max().item()
    num = (a - b).abs().max().item()
    if denom == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / denom
