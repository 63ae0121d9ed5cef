"""Tests for lorasuite_core.report.render: PNG heatmap and Markdown tables."""

from __future__ import annotations

import io

import numpy as np
import pytest

from lorasuite_core.report.render import (
    cka_heatmap_png,
    evaluation_table,
    head_mapping_summary,
    layer_mapping_table,
    markdown_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cka_heatmap_is_a_decodable_png():
    import matplotlib.image

    rng = np.random.default_rng(0)
    cka = rng.uniform(0, 1, size=(6, 9))
    cka[2, 3] = np.nan
    png = cka_heatmap_png(cka, [(0, 0), (2, 4), (5, 8)], "old -> new", dpi=80)
    assert png.startswith(PNG_MAGIC)
    image = matplotlib.image.imread(io.BytesIO(png), format="png")
    height, width = image.shape[:2]
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 200 <= height <= 14 * 80 and 200 <= width <= 16 * 80
    assert float(image[..., :3].std()) > 0.05  # not a blank canvas


def test_cka_heatmap_rejects_bad_input():
    with pytest.raises(ValueError, match="outside the CKA matrix"):
        cka_heatmap_png(np.zeros((2, 3)), [(2, 0)], "t")
    with pytest.raises(ValueError, match="2-D"):
        cka_heatmap_png(np.zeros(4), [], "t")


def test_markdown_table_formats_and_escapes():
    table = markdown_table(
        [{"name": "a|b", "loss": 0.123456, "n": 3, "ok": True}, {"name": "multi\nline", "loss": None}],
        ["name", "loss", "n", "ok"],
    )
    lines = table.strip().split("\n")
    assert lines[0] == "| name | loss | n | ok |"
    assert lines[1] == "| --- | --- | --- | --- |"
    assert lines[2] == "| a\\|b | 0.1235 | 3 | True |"
    assert lines[3] == "| multi<br>line |  |  |  |"
    with pytest.raises(ValueError):
        markdown_table([], [])


def test_layer_mapping_table_lists_pairs_cka_and_unmapped_layers():
    cka = np.array([[0.9, 0.1, 0.2], [0.3, 0.8, 0.7]])
    table = layer_mapping_table([(0, 0), (1, 1)], cka)
    assert "| new layer | old layer | CKA |" in table
    assert "| 0 | 0 | 0.9 |" in table and "| 1 | 1 | 0.8 |" in table
    assert "without a mapped old layer: 2" in table
    assert "CKA" not in layer_mapping_table([(0, 1)])


def test_head_mapping_summary_reports_permutations_and_similarity():
    text = head_mapping_summary(
        {"10": [0, 1, 2, 3], "2": [1, 0, 3, 2]},
        {"2": [0.5, 0.7, 0.9, 0.9], "10": 0.99},
    )
    assert text.startswith("2 layer(s); 1 with a non-identity head permutation.")
    rows = [line for line in text.splitlines() if line.startswith("| 2 ") or line.startswith("| 10 ")]
    assert rows[0] == "| 2 | 4 | 4 | [1, 0, 3, 2] | 0.75 |"  # numeric layer order
    assert rows[1] == "| 10 | 4 | 0 | [0, 1, 2, 3] | 0.99 |"


def test_evaluation_table_nested_and_flat():
    nested = evaluation_table({
        "support-bot": {"old_base": {"loss": 1.5}, "migrated": {"loss": 1.25, "accuracy": 0.8}},
        "sql": {"old_base": {"loss": 2.0}},
    })
    assert "| run | old_base.loss | migrated.loss | migrated.accuracy |" in nested
    assert "| support-bot | 1.5 | 1.25 | 0.8 |" in nested
    assert "| sql | 2 |  |  |" in nested
    flat = evaluation_table({"perplexity": 12.34567, "samples": 100})
    assert "| perplexity | 12.35 |" in flat and "| samples | 100 |" in flat
    assert evaluation_table({}) == "_no evaluation results_\n"


def test_head_mapping_summary_accepts_pairs_and_report_entries():
    report_entry = {"old_layer": 3, "query_heads": [[1, 0], [0, 1]], "head_similarity": [0.5, 1.0]}
    text = head_mapping_summary({"4": report_entry, "5": [[0, 0], [1, 1]]}, {})
    assert "| 4 | 2 | 2 | [1, 0] | 0.75 |" in text
    assert "| 5 | 2 | 0 | [0, 1] |  |" in text
