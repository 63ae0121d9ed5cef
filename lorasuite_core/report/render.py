"""Renderers for migration reports: a CKA heatmap PNG and Markdown tables.

Design
------
Pure functions from plain Python / numpy data to ``bytes`` (PNG) or ``str``
(Markdown) so that the flows can hand the results straight to Prefect artifacts
(``create_markdown_artifact``, ``create_image_artifact`` via a stored PNG) or to
files, and so that this module never imports Prefect.

* Plots use matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``:
  no global figure state, no GUI backend, safe in worker threads.
* Markdown cells are escaped (``|`` and newlines), floats are shown with four
  significant digits, ``None`` / missing values as an empty cell.
* Conventions: layer mappings are ``(old_layer, new_layer)`` pairs; in the CKA
  matrix rows are old-model layers and columns new-model layers; a head map is
  ``{layer (str): [head permutation]}`` (new head i <- old head perm[i]); (old, new)
  pairs and the migration report's ``head_mapping`` entries are accepted as well.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_MAX_FIGURE_INCHES = 14.0
_MIN_FIGURE_INCHES = 4.0


# --------------------------------------------------------------------------- heatmap


def _validate_cka(cka: np.ndarray, mapping: Sequence[tuple[int, int]]) -> np.ndarray:
    matrix = np.asarray(cka, dtype=float)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"cka must be a non-empty 2-D matrix, got shape {matrix.shape}")
    n_old, n_new = matrix.shape
    for old, new in mapping:
        if not (0 <= old < n_old and 0 <= new < n_new):
            raise ValueError(f"mapping pair ({old}, {new}) outside the CKA matrix of shape {matrix.shape}")
    return matrix


def _figure_size(n_old: int, n_new: int) -> tuple[float, float]:
    def side(n: int) -> float:
        return min(_MAX_FIGURE_INCHES, max(_MIN_FIGURE_INCHES, 0.25 * n + 2.0))

    return side(n_new) + 1.5, side(n_old)


def _tick_positions(n: int, max_ticks: int = 24) -> list[int]:
    step = max(1, math.ceil(n / max_ticks))
    return list(range(0, n, step))


def cka_heatmap_png(cka: np.ndarray, mapping: Sequence[tuple[int, int]], title: str, *, dpi: int = 100) -> bytes:
    """PNG bytes of the old-by-new CKA matrix with the chosen (old, new) layer pairs marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = _validate_cka(cka, mapping)
    n_old, n_new = matrix.shape
    figure = Figure(figsize=_figure_size(n_old, n_new), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(np.ma.masked_invalid(matrix), origin="lower", aspect="auto", cmap="viridis",
                        vmin=0.0, vmax=1.0, interpolation="nearest")
    if mapping:
        olds, news = zip(*mapping)
        axes.scatter(news, olds, marker="s", s=36, facecolors="none", edgecolors="red", linewidths=1.5)
        title = f"{title}\n(red squares: mapped old -> new layer pairs)"
    axes.set_xlabel("new model layer")
    axes.set_ylabel("old model layer")
    axes.set_xticks(_tick_positions(n_new))
    axes.set_yticks(_tick_positions(n_old))
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="linear CKA")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# --------------------------------------------------------------------------- markdown


def format_cell(value: Any) -> str:
    """One Markdown table cell: escaped text, floats to 4 significant digits, None -> empty."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.4g}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """GitHub-flavoured Markdown table of ``rows`` restricted to ``columns`` (in that order)."""
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    header = "| " + " | ".join(format_cell(c) for c in columns) + " |"
    separator = "|" + "|".join(" --- " for _ in columns) + "|"
    body = ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join([header, separator, *body]) + "\n"


def layer_mapping_table(mapping: Sequence[tuple[int, int]], cka: np.ndarray | None = None) -> str:
    """Markdown table of (old layer -> new layer) pairs, with their CKA when ``cka`` is given.

    With ``cka``, new layers that receive no old layer are listed below the table.
    """
    matrix = _validate_cka(cka, mapping) if cka is not None else None
    rows = []
    for old, new in sorted(mapping, key=lambda pair: (pair[1], pair[0])):
        row: dict[str, Any] = {"new layer": new, "old layer": old}
        if matrix is not None:
            row["CKA"] = float(matrix[old, new])
        rows.append(row)
    columns = ["new layer", "old layer"] + (["CKA"] if matrix is not None else [])
    text = markdown_table(rows, columns)
    if matrix is not None:
        unmapped = sorted(set(range(matrix.shape[1])) - {new for _, new in mapping})
        if unmapped:
            text += f"\nNew layers without a mapped old layer: {', '.join(map(str, unmapped))}\n"
    return text


def _mean_similarity(value: Any) -> float | None:
    if value is None:
        return None
    array = np.asarray(value, dtype=float)
    return float(np.nanmean(array)) if array.size else None


def _compact_permutation(perm: Sequence[int], limit: int = 16) -> str:
    shown = ", ".join(str(int(p)) for p in perm[:limit])
    return f"[{shown}{', ...' if len(perm) > limit else ''}]"


def _as_permutation(entry: Any) -> list[int]:
    """Position = new head, value = old head, from a list of ints or of (old, new) pairs.

    A migration-report entry (a dict with ``query_heads`` pairs) is accepted too.
    """
    if isinstance(entry, Mapping):
        entry = entry.get("query_heads", [])
    items = list(entry)
    if items and isinstance(items[0], (list, tuple)):
        return [int(old) for old, _new in sorted(items, key=lambda pair: pair[1])]
    return [int(head) for head in items]


def _layer_similarity(layer: Any, entry: Any, similarity: Mapping[str, Any]) -> float | None:
    value = similarity.get(layer, similarity.get(_other_key(layer)))
    if value is None and isinstance(entry, Mapping):
        value = entry.get("head_similarity")
    return _mean_similarity(value)


def head_mapping_summary(head_map: Mapping[str, Any], similarity: Mapping[str, Any]) -> str:
    """Markdown summary of per-layer head permutations and their matched-head similarity.

    ``head_map[layer]`` is a permutation (new head i <- old head perm[i]), a list of
    (old, new) head pairs, or a migration-report entry with ``query_heads`` pairs.
    ``similarity[layer]`` may be a number or per-head similarities (their mean is
    shown); without it a report entry's ``head_similarity`` is used, else the cell is empty.
    """
    rows = []
    for layer in sorted(head_map, key=_layer_sort_key):
        perm = _as_permutation(head_map[layer])
        moved = sum(1 for position, head in enumerate(perm) if position != head)
        rows.append({
            "layer": layer,
            "heads": len(perm),
            "moved": moved,
            "permutation": _compact_permutation(perm),
            "mean similarity": _layer_similarity(layer, head_map[layer], similarity),
        })
    permuted = sum(1 for row in rows if row["moved"])
    summary = f"{len(rows)} layer(s); {permuted} with a non-identity head permutation.\n\n"
    return summary + markdown_table(rows, ["layer", "heads", "moved", "permutation", "mean similarity"])


def _layer_sort_key(layer: Any) -> tuple[int, Any]:
    text = str(layer)
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)


def _other_key(layer: Any) -> Any:
    """The int key for a numeric string layer and vice versa (JSON turns int keys into strings)."""
    text = str(layer)
    if text.lstrip("-").isdigit():
        return int(text) if isinstance(layer, str) else text
    return text


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _ordered_union(keys: Iterable[Iterable[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for group in keys:
        for key in group:
            seen.setdefault(key, None)
    return list(seen)


def evaluation_table(results: Mapping[str, Any], *, row_label: str = "run") -> str:
    """Markdown table of evaluation results.

    ``{run: {metric: value, ...}, ...}`` gives one row per run and one column per
    metric (nested dicts flattened to dotted names, e.g. ``accuracy.new``);
    a flat ``{metric: value}`` gives a two-column metric/value table.
    """
    if not results:
        return "_no evaluation results_\n"
    if not any(isinstance(v, Mapping) for v in results.values()):
        return markdown_table([{"metric": k, "value": v} for k, v in results.items()], ["metric", "value"])
    rows = []
    for run, metrics in results.items():
        flat = _flatten(metrics) if isinstance(metrics, Mapping) else {"value": metrics}
        rows.append({row_label: run, **flat})
    metric_columns = _ordered_union([k for k in row if k != row_label] for row in rows)
    return markdown_table(rows, [row_label, *metric_columns])
