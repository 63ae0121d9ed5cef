"""Prefect UI artifacts of a migration run, rendered by :mod:`lorasuite_core.report_render`.

* CKA heatmap: a Markdown artifact embedding the PNG as a ``data:image/png;base64`` URI.  It
  renders in the Prefect UI without any image hosting (an image artifact needs a URL the
  browser can fetch: a local path cannot be fetched, and a presigned object-store URL would
  expire and carry credentials).  The figure is kept small (dpi 72, a few tens of kB).
* Layer mapping table (with each pair's CKA), head-mapping summary, per-adapter evaluation
  table, and for fleets a progress artifact plus a summary table of the entries.

Keys (lowercase, digits, dashes) group the artifacts of successive runs in the Artifacts page;
every artifact is also attached to the run that creates it.  Model references are shown
redacted (no credentials or query strings).
"""
from __future__ import annotations

import base64
import re
from typing import Any, Mapping

import numpy as np
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, update_progress_artifact)

from lorasuite_core.report_render import (cka_heatmap_png, evaluation_table, head_mapping_summary, layer_mapping_table,
                                          markdown_table)
from lorasuite_core.stage_store import StageResult
from lorasuite_core.storage import redact_uri


def artifact_key(*parts: str) -> str:
    text = "-".join(["lorasuite", *parts]).lower()
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text)).strip("-")[:100]


def pair_title(old_model: str, new_model: str) -> str:
    return f"{redact_uri(old_model)} -> {redact_uri(new_model)}"


def analysis_artifacts(old_model: str, new_model: str, mapping: StageResult, heads: StageResult) -> None:
    """CKA heatmap, layer-mapping table and head-mapping summary of the pair analysis."""
    title = pair_title(old_model, new_model)
    cka = np.asarray(mapping.facts["cka"], dtype=float)
    pairs = [(int(i), int(j)) for i, j in mapping.facts["layer_mapping"]]
    png = base64.b64encode(cka_heatmap_png(cka, pairs, "CKA of layer updates", dpi=72)).decode()
    create_markdown_artifact(
        f"## CKA heatmap\n\n{title}\n\n![CKA heatmap](data:image/png;base64,{png})\n",
        key=artifact_key("cka-heatmap"), description=f"CKA of layer updates, {title}")
    create_markdown_artifact(f"## Layer mapping\n\n{title}\n\n{layer_mapping_table(pairs, cka)}",
                             key=artifact_key("layer-mapping"), description=f"old -> new layers, {title}")
    create_markdown_artifact(f"## Head mapping\n\n{title}\n\n{head_mapping_summary(heads.facts['head_mapping'], {})}",
                             key=artifact_key("head-mapping"), description=f"head permutations, {title}")


def evaluation_artifact(name: str, rows: Mapping[str, Mapping[str, Any]]) -> None:
    """Accuracy (95% Wilson CI) of each evaluated model/adapter combination of one adapter."""
    table = {row: {"accuracy": f["accuracy"], "ci_low": f["ci_low"], "ci_high": f["ci_high"], "n": f["n"]}
             for row, f in rows.items()}
    create_markdown_artifact(f"## Evaluation: {name}\n\n{evaluation_table(table, row_label='model + adapter')}",
                             key=artifact_key("evaluation", name), description=f"evaluation of {name}")


def fleet_summary_artifact(entries: list[Mapping[str, Any]]) -> None:
    rows = [{"adapter": e["name"], "status": e["status"], "output": redact_uri(e["output"]),
             "reason": e.get("error") or e.get("note")} for e in entries]
    create_markdown_artifact("## Fleet migration\n\n" + markdown_table(rows, ["adapter", "status", "output", "reason"]),
                             key=artifact_key("fleet-summary"), description="status of every fleet entry")


class ProgressArtifact:
    """A progress bar in the UI, updated as fleet entries advance (0-100)."""

    def __init__(self, description: str):
        self.id = create_progress_artifact(0.0, key=artifact_key("fleet-progress"), description=description)

    def update(self, percent: float) -> None:
        update_progress_artifact(self.id, round(min(100.0, max(0.0, percent)), 1))
