"""Which candidate routes an adapter's migration computes, and the route checks of the one pre-run check.

``options.route`` (:mod:`.options`) names one route, or ``auto``; each route's adapter is one entry
of the entry graph (:mod:`.graph`)::

    copy           -> "copy"        the old adapter as is (same family, dims and vocabulary only)
    transfer       -> "lft" where LFT runs (labelled, or distilled when --lft-mode distill), else "migrated"
    distill        -> "lft"         the transfer + distilled LFT
    fresh-distill  -> "fresh_lft"   a fresh LoRA (B = 0) distilled exactly like ``distill``

``auto`` plans every candidate that applies, cheapest first: copy where eligible, the transfer
(transfer-only when the LFT distils, since the distilled one is the ``distill`` candidate; with
labelled LFT data, transfer + that LFT), and ``distill`` and ``fresh-distill`` where there are
prompts to distil on (``--lft-mode distill``).  The ``route`` stage then scores them and publishes the
best that clears the quality gate (:mod:`lorasuite_core.training.route`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.loading import LoadedModel
from lorasuite_core.pipeline.options import DISTILL_ROUTES, MigrationOptions

#: The entry-graph stage holding each route's adapter (``transfer``: see :func:`candidate_stages`).
ROUTE_STAGE = {"copy": "copy", "distill": "lft", "fresh-distill": "fresh_lft"}
#: An adapter stage's name in the fidelity facts (kept from before routes: the transfer and its LFT).
FIDELITY_NAME = {"copy": "copy", "migrated": "transfer", "lft": "lft", "fresh_lft": "fresh-distill"}


def copy_refusal(old: LoadedModel, new: LoadedModel) -> str | None:
    """Why the old adapter cannot be used as is on the new model (None: it can): another family, other
    dimensions, or tokenisers whose shared vocabulary is not the identity over both whole vocabularies."""
    from lorasuite_core.transfer.vocab import shared_vocabulary, surface_forms

    if old.family.name != new.family.name:
        return f"the old model is {old.family.name}, the new one {new.family.name}"
    if old.dims != new.dims:
        differ = [f"{k} {a} vs {b}" for (k, a), b in zip(vars(old.dims).items(), vars(new.dims).values()) if a != b]
        return "the shapes differ: " + ", ".join(differ)
    old_tok, new_tok = old.tokenizer(), new.tokenizer()
    shared = shared_vocabulary(old_tok, new_tok)
    same = (len(old_tok) == len(new_tok) and np.array_equal(shared.old_ids, shared.new_ids)
            and len(shared) == len(surface_forms(old_tok)) == len(surface_forms(new_tok))
            and sorted(old_tok.all_special_ids) == sorted(new_tok.all_special_ids))
    return None if same else (f"the tokenisers differ ({len(shared)} shared tokens of {len(old_tok)} old and "
                              f"{len(new_tok)} new, not all with the same ids)")


def check_route(options: MigrationOptions, refusal: Callable[[], str | None]) -> None:
    """The route's needs, before any work: copy only where ``refusal()`` (:func:`copy_refusal` of the pair; called
    for ``copy`` only, so no other route loads a model here) finds nothing; the distill routes need prompts; auto
    needs held-out prompts (it scores on the gate's measure)."""
    if options.route == "copy":
        reason = refusal()
        if reason:
            raise LorasuiteError(f"route copy needs the same architecture, shapes and vocabulary, but {reason}; "
                                 "use --route transfer (or auto)")
    if options.route in DISTILL_ROUTES and not options.has_lft_data:
        raise LorasuiteError(f"route {options.route} needs prompts to distil on (--lft-prompts, --lft-seed-prompts "
                             "or --lft-data)")
    if options.route == "auto" and not options.has_heldout:
        raise LorasuiteError("--route auto (scored on the quality gate's measure) needs held-out prompts: "
                             "--eval-data, or distilled LFT (--lft-mode distill) whose prompts it splits")


def candidate_stages(options: MigrationOptions, copy_ok: bool) -> dict[str, str]:
    """Candidate route -> the entry-graph stage holding its adapter, cheapest first (module docstring)."""
    distils = options.runs_lft and options.lft_mode == "distill"
    if options.route != "auto":
        if options.route == "transfer":
            return {"transfer": "lft" if options.runs_lft else "migrated"}
        return {options.route: ROUTE_STAGE[options.route]}
    candidates = {"copy": "copy"} if copy_ok else {}
    candidates["transfer"] = "lft" if options.runs_lft and not distils else "migrated"
    if distils:
        candidates.update({"distill": "lft", "fresh-distill": "fresh_lft"})
    return candidates
