"""The migration report (``migration_report.json``): what was migrated, how, and how well.

It names both models (source, fingerprint, dims), the adapter and its variant, the options, the
shared vocabulary's size, the residual transfer's fit, the calibration, the CKA matrices, the layer
and head mappings, the per-unit fit and re-factorisation residuals, the dropped roles, the LayerNorm
offset effect, DoRA's magnitude residuals, the zero-initialised layers and the step timings.
Built from the results of :mod:`lorasuite_core.transfer.adapter`.
"""
from __future__ import annotations

from typing import Any

from lorasuite_core import ALGORITHM_VERSION, __version__
from lorasuite_core.models.loading import LoadedModel
from lorasuite_core.transfer.adapter import MigratedAdapter, PairAnalysis


def _model_identity(model: LoadedModel) -> dict:
    from lorasuite_core.io.fingerprints import dir_fingerprint

    d = model.dims
    return {
        "source": model.source,
        "fingerprint": dir_fingerprint(str(model.local_dir)),
        "model_type": model.config.get("model_type"),
        "family": model.family.name,
        "hidden_size": d.hidden,
        "num_layers": d.num_layers,
        "num_heads": d.num_heads,
        "num_kv_heads": d.num_kv_heads,
        "head_dim": d.head_dim,
        "intermediate_size": d.intermediate,
    }


def head_mapping_entries(analysis: PairAnalysis) -> dict[str, dict[str, Any]]:
    """Per new layer: the old layer, head/kv assignments and similarities (the report's head_mapping)."""
    heads = {}
    for i, j in analysis.layer_mapping:
        m = analysis.matches[i]
        heads[str(j)] = {
            "old_layer": i,
            "query_heads": [[a, b] for a, b in m.head_pairs],
            "kv_heads": [[a, b] for a, b in m.kv_pairs],
            "head_similarity": [round(float(m.head_similarity[a, b]), 6) for a, b in m.head_pairs],
            "neuron_similarity_mean": round(m.neuron_similarity_mean, 6),
        }
    return heads


def build_report(old, new, adapter, analysis: PairAnalysis, migrated: MigratedAdapter, head_transform: str,
                 layer_offset: int | None, steps: dict[str, dict[str, Any]]) -> dict:
    heads = head_mapping_entries(analysis)
    return {
        "lorasuite_version": __version__,
        "algorithm_version": ALGORITHM_VERSION,
        "old_model": _model_identity(old),
        "new_model": _model_identity(new),
        "adapter": {"source": adapter.source, "modules": len(adapter.factors), "variant": adapter.variant.name},
        "options": {"head_transform": head_transform, "layer_offset": layer_offset},
        "shared_vocabulary_size": len(analysis.shared),
        "transfer_matrix": {
            "fit_residual_old": analysis.residual.fit_residual_old,
            "fit_residual_new": analysis.residual.fit_residual_new,
            "scale": analysis.residual.scale,
        },
        "calibration": analysis.calibration,
        "cka": analysis.cka_updates.round(6).tolist(),
        "cka_hidden_states": analysis.cka_states.round(6).tolist(),
        "layer_mapping": [[i, j] for i, j in analysis.layer_mapping],
        "head_mapping": heads,
        "unit_fit_residual": migrated.unit_fit,
        "refactorisation_residual": {
            new.family.module_key(m.layer, m.name): m.factors.residual for m in migrated.modules
        },
        "dropped_roles": migrated.dropped,
        "layernorm_offset_effect": migrated.input_offsets,
        "dora_magnitude_residual": {
            new.family.module_key(m.layer, m.name): m.magnitude_fit for m in migrated.modules
            if m.magnitude_fit and m.old_layers
        },
        "zero_initialised_layers": migrated.zero_init_layers,
        "steps": steps,
    }
