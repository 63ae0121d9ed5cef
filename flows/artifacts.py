"""Prefect UI artifacts of a migration run, rendered by :mod:`lorasuite_core.report.render`.

* CKA heatmap: a Markdown artifact embedding the PNG as a ``data:image/png;base64`` URI.  It
  renders in the Prefect UI without any image hosting (an image artifact needs a URL the
  browser can fetch: a local path cannot be fetched, and a presigned object-store URL would
  expire and carry credentials).  The figure is kept small (dpi 72, a few tens of kB).
* Layer mapping table (with each pair's CKA), per-adapter evaluation table, and for fleets a
  progress artifact plus a summary table of the entries.
* Head mapping: one row per mapped new layer, then one row per *new* query head — its old
  source head and their similarity cos(QK) + cos(VO), on the scale [-2, 2] (2: the same head up
  to the residual transfer), or ``new (no source)`` for a head the old layer has no match for
  (the new model has more heads).  The new model's head count comes from its config.
* Fleet progress: the pair-analysis stages fill the first :data:`ANALYSIS_SHARE` percent
  (one step per finished stage), the adapter waves the rest; the description names the current
  step and, at the end, ``Completed: ...`` or ``Failed: <reason>`` (:class:`ProgressArtifact`).

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

from lorasuite_core.report.render import cka_heatmap_png, evaluation_table, layer_mapping_table, markdown_table
from lorasuite_core.pipeline.stage_store import StageResult
from lorasuite_core.io.uris import redact_uri


def artifact_key(*parts: str) -> str:
    text = "-".join(["lorasuite", *parts]).lower()
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text)).strip("-")[:100]


def pair_title(old_model: str, new_model: str) -> str:
    return f"{redact_uri(old_model)} -> {redact_uri(new_model)}"


def analysis_artifacts(old_model: str, new_model: str, cka: np.ndarray, mapping: StageResult, heads: StageResult,
                       new_heads: int | None = None, new_layers: int | None = None) -> None:
    """CKA heatmap, layer-mapping table and head-mapping table of the pair analysis.

    ``cka``: the CKA of layer updates (read from the cka entry, stored once); ``new_heads`` /
    ``new_layers``: query heads per layer and layers of the new model (default: what the mapping names)."""
    title = pair_title(old_model, new_model)
    cka = np.asarray(cka, dtype=float)
    pairs = [(int(i), int(j)) for i, j in mapping.facts["layer_mapping"]]
    png = base64.b64encode(cka_heatmap_png(cka, pairs, "CKA of layer updates", dpi=72)).decode()
    create_markdown_artifact(
        f"## CKA heatmap\n\n{title}\n\n![CKA heatmap](data:image/png;base64,{png})\n",
        key=artifact_key("cka-heatmap"), description=f"CKA of layer updates, {title}")
    create_markdown_artifact(f"## Layer mapping\n\n{title}\n\n{layer_mapping_table(pairs, cka)}",
                             key=artifact_key("layer-mapping"), description=f"old -> new layers, {title}")
    create_markdown_artifact(f"## Head mapping\n\n{title}\n\n{head_mapping_markdown(heads.facts['head_mapping'], new_heads, new_layers)}",
                             key=artifact_key("head-mapping"), description=f"head permutations, {title}")


SIMILARITY_SCALE = "cos(QK) + cos(VO), range [-2, 2]; 2 = the same head up to the residual transfer"
NO_SOURCE = "new (no source)"


def head_mapping_markdown(head_map: Mapping[str, Any], new_heads: int | None = None,
                          new_layers: int | None = None) -> str:
    """Per new layer a summary row, then every new query head with its old source (or none).

    A new layer no old layer maps to (``new_layers`` beyond the mapping) has only new heads.

    ``head_map``: the head_similarity stage's ``head_mapping`` facts, ``{new layer: {"old_layer",
    "query_heads": [[old, new], ...], "head_similarity": [...]}}`` (similarities in pair order)."""
    layers, heads, permuted = [], [], 0
    mapped = {int(key): head_map[key] for key in head_map}
    count = max([new_heads or 0] + [new + 1 for e in mapped.values() for _, new in e.get("query_heads", [])])
    for layer in range(max([new_layers or 0, *(k + 1 for k in mapped)])):
        entry = mapped.get(layer, {"old_layer": None})
        pairs = [(int(old), int(new)) for old, new in entry.get("query_heads", [])]
        sims = [float(x) for x in entry.get("head_similarity", [])]
        source = {new: (old, sims[k] if k < len(sims) else None) for k, (old, new) in enumerate(pairs)}
        moved = sum(1 for new, (old, _) in source.items() if old != new)
        permuted += bool(moved)
        old_layer = entry["old_layer"]
        layers.append({"new layer": layer, "old layer": NO_SOURCE if old_layer is None else old_layer, "new heads": count,
                       "with a source": len(source), NO_SOURCE: count - len(source), "moved": moved,
                       "mean similarity (of 2)": round(float(np.mean(sims)), 4) if sims else None})
        for h in range(count):
            old, sim = source.get(h, (None, None))
            heads.append({"new layer": layer, "new head": h, "old head": NO_SOURCE if old is None else old,
                          "similarity (of 2)": None if sim is None else round(sim, 4)})
    return (f"{len(layers)} layer(s); {permuted} with a non-identity head permutation.  Head similarity: "
            f"{SIMILARITY_SCALE}.\n\n"
            + markdown_table(layers, ["new layer", "old layer", "new heads", "with a source", NO_SOURCE, "moved",
                                      "mean similarity (of 2)"])
            + "\n### Every new head\n\n"
            + markdown_table(heads, ["new layer", "new head", "old head", "similarity (of 2)"]))


def evaluation_artifact(name: str, rows: Mapping[str, Mapping[str, Any]]) -> None:
    """Accuracy (95% Wilson CI) of each evaluated model/adapter combination of one adapter."""
    table = {row: {"accuracy": f["accuracy"], "ci_low": f["ci_low"], "ci_high": f["ci_high"], "n": f["n"]}
             for row, f in rows.items()}
    create_markdown_artifact(f"## Evaluation: {name}\n\n{evaluation_table(table, row_label='model + adapter')}",
                             key=artifact_key("evaluation", name), description=f"evaluation of {name}")


def _gate_cell(entry: Mapping[str, Any]) -> str:
    gate = (entry.get("summary") or {}).get("quality_gate")
    if not gate:
        return "failed (see reason)" if "quality gate failed" in (entry.get("error") or "") else "-"
    return (f"passed: teacher agreement {gate['student_agreement']:.3f} vs bare {gate['bare_agreement']:.3f} "
            f"(margin {gate['margin']:g}, n={gate['n']})")


def _fidelity_cell(entry: Mapping[str, Any]) -> str:
    """``transfer 0.12, lft 0.87``: the share of the teacher gap each adapter closes (n/a: no gap)."""
    scores = (entry.get("summary") or {}).get("fidelity")
    if not scores:
        return "-"
    return ", ".join(f"{name} {'n/a' if value is None else f'{value:.3f}'}" for name, value in scores.items())


def _route_cell(entry: Mapping[str, Any]) -> str:
    """``auto: transfer (copy agreement 0.250 F 0.000; transfer agreement 1.000 F 1.000)``: the route, the one chosen
    and every candidate's numbers where scored."""
    route = (entry.get("summary") or {}).get("route")
    if not route:
        return "-"
    number = lambda v: "n/a" if v is None else f"{v:.3f}"
    scored = [f"{c['route']} agreement {number(c['teacher_agreement'])} F {number(c.get('fidelity'))}"
              + ("" if c.get("passed", True) else " (below the gate)")
              for c in route["candidates"] if "teacher_agreement" in c]
    head = route["route"] if route["route"] == route["chosen"] else f"{route['route']}: {route['chosen']}"
    return head + (f" ({'; '.join(scored)})" if scored else "")


def fleet_summary_artifact(entries: list[Mapping[str, Any]]) -> None:
    rows = [{"adapter": e["name"], "status": e["status"], "output": redact_uri(e["output"]), "route": _route_cell(e),
             "fidelity": _fidelity_cell(e), "quality gate": _gate_cell(e), "reason": e.get("error") or e.get("note")}
            for e in entries]
    columns = ["adapter", "status", "output", "route", "fidelity", "quality gate", "reason"]
    create_markdown_artifact("## Fleet migration\n\n" + markdown_table(rows, columns),
                             key=artifact_key("fleet-summary"), description="status of every fleet entry")


ANALYSIS_SHARE = 40.0     # percent of a fleet run's progress bar taken by the pair-analysis stages


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return redact_uri(text if len(text) <= 300 else text[:297] + "...")


class ProgressArtifact:
    """A progress bar in the UI (0-100): the pair analysis up to ``ANALYSIS_SHARE``, then the entries.

    It advances as each analysis stage and each adapter wave finishes, and its description says what
    is running (``pair analysis: 3/7 stages``, ``adapters: 40%``), then how the run ended
    (``Completed: 2 published, 0 skipped`` or ``Failed: <reason>``, with the bar where it stopped)."""

    def __init__(self, description: str):
        self.title = description
        self.id = create_progress_artifact(0.0, key=artifact_key("fleet-progress"),
                                           description=f"{description}: starting")
        self.percent = 0.0

    def update(self, percent: float, status: str | None = None) -> None:
        self.percent = round(min(100.0, max(0.0, percent)), 1)
        update_progress_artifact(self.id, self.percent, description=f"{self.title}: {status}" if status else None)

    def analysis(self, done: int, total: int) -> None:
        """``done`` of ``total`` pair-analysis stages finished."""
        self.update(ANALYSIS_SHARE * done / max(1, total), f"pair analysis: {done}/{total} stages")

    def entries(self, percent: float) -> None:
        """The adapter entries are ``percent`` done (what the runner's ``migrate`` reports)."""
        self.update(ANALYSIS_SHARE + (100.0 - ANALYSIS_SHARE) * percent / 100.0, f"adapters: {percent:.0f}%")

    def finish(self, outcome: str) -> None:
        """The run's end: ``Completed: ...`` fills the bar; ``Failed: ...`` leaves it where it stopped."""
        self.update(100.0 if outcome.startswith("Completed") else self.percent, outcome)
