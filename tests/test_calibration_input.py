"""Calibration files are streamed and capped (reliability issue, finding B).

Real files on disk (and one on moto's S3 server): a giant single line is cut to the cap with
bounded memory (peak RSS measured in a fresh process), reading stops once the token budget is
covered, the result is deterministic and depends only on the text used, and binary files or
directories end as one-line LorasuiteErrors (through the real CLI too).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from lorasuite_core.transfer.activations import (CHARS_PER_TOKEN, JSONL_LINE_FACTOR, MAX_TOKENS_PER_TEXT,
                                        calibration_text_cap, read_calibration_file)
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.options import AnalysisOptions
from lorasuite_core.pipeline.stage_store import texts_identity
from tests.s3_server import s3_endpoint  # noqa: F401  (fixture)

TOKENS = AnalysisOptions().max_calibration_tokens     # the options schema's default budget
WORDS = "alpha beta gamma delta residual stream layer token ".split()


BLOCK = (" ".join(WORDS) + " ") * 2048


def _write_single_line(path, mib: int) -> None:
    block = BLOCK
    with open(path, "w") as handle:
        for _ in range(mib * 2**20 // len(block)):
            handle.write(block)
        handle.write("\n")


def _lines(n: int, width: int = 100) -> list[str]:
    return [f"{i:06d} " + ("word " * width)[: width - 7] for i in range(n)]


def test_a_50_mib_single_line_is_capped_with_bounded_memory(tmp_path):
    path = tmp_path / "one-line.txt"
    _write_single_line(path, 50)
    probe = textwrap.dedent(f"""
        import json, resource
        from lorasuite_core.transfer.activations import read_calibration_file
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        texts = read_calibration_file({str(path)!r}, {TOKENS})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"growth_kib": after - before, "lengths": [len(t) for t in texts], "head": texts[0][:40]}}))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cap = calibration_text_cap(TOKENS)
    assert result["lengths"] == [len(BLOCK[:cap].strip())]     # the first cap characters, stripped
    assert result["head"] == " ".join(WORDS)[:40]
    # the old reader held the file as bytes, str, splitlines and strip copies: >= 150 MiB here
    assert result["growth_kib"] < 32 * 1024, result["growth_kib"]


def test_reading_stops_once_the_budget_is_covered_and_depends_only_on_what_is_used(tmp_path):
    lines = _lines(5000)
    full, short = tmp_path / "full.txt", tmp_path / "short.txt"
    full.write_text("\n".join(lines) + "\n")
    texts = read_calibration_file(str(full), TOKENS)
    wanted = CHARS_PER_TOKEN * TOKENS
    used = -(-wanted // min(100, MAX_TOKENS_PER_TEXT))   # 100-character lines: ceil(wanted / 100)
    assert texts == lines[:used]
    assert read_calibration_file(str(full), TOKENS) == texts                # deterministic
    short.write_text("\n".join(lines[:used]) + "\n")
    assert texts_identity(read_calibration_file(str(short), TOKENS)) == texts_identity(texts)
    with open(full, "ab") as handle:                                        # never read: past the stop
        handle.write(b"\xff\xfe\x00 garbage after the budget\n")
    assert read_calibration_file(str(full), TOKENS) == texts
    bigger = read_calibration_file(str(full.with_name("full.txt")), max_tokens=4096)
    assert bigger == lines[: 2 * used]


def test_small_files_are_read_whole_as_before(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("  first sample \r\n\nsecond\rthird\u2028fourth\n\n")
    assert read_calibration_file(str(path), TOKENS) == ["first sample", "second", "third", "fourth"]


def test_jsonl_text_field_is_read_and_capped(tmp_path):
    cap = calibration_text_cap(256)
    path = tmp_path / "calib.jsonl"
    records = [{"text": "short one"}, {"text": "x" * (3 * cap), "id": 2}, {"text": " \t"}, {"text": "after"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_calibration_file(str(path), max_tokens=256) == ["short one", "x" * cap, "after"]


def test_jsonl_line_longer_than_the_line_cap_is_refused_by_number(tmp_path):
    cap = calibration_text_cap(TOKENS)
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "y" * (JSONL_LINE_FACTOR * cap)}) + "\n")
    with pytest.raises(LorasuiteError, match=r"line 2 is longer than \d+ characters") as info:
        read_calibration_file(str(path), TOKENS)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("content, needle", [
    (bytes(range(256)) * 64, "is not UTF-8 text"),
    (b"hello\x00world\n" * 8, "holds NUL bytes"),
    (b'{"text": "fine"}\n{"text": "a\x00b"}\n', "holds NUL bytes"),
])
def test_binary_file_is_a_one_line_error_naming_it(tmp_path, content, needle):
    path = tmp_path / ("calib.jsonl" if content.startswith(b"{") else "calib.txt")
    path.write_bytes(content)
    with pytest.raises(LorasuiteError, match=needle) as info:
        read_calibration_file(str(path), TOKENS)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_directory_or_missing_file_is_a_one_line_error(tmp_path):
    (tmp_path / "calib.txt").mkdir()
    with pytest.raises(LorasuiteError, match="is a directory") as info:
        read_calibration_file(str(tmp_path / "calib.txt"), TOKENS)
    assert str(tmp_path / "calib.txt") in str(info.value)
    with pytest.raises(LorasuiteError, match="does not exist"):
        read_calibration_file(str(tmp_path / "missing.jsonl"), TOKENS)


def test_s3_calibration_file_is_streamed_and_capped(tmp_path, s3_endpoint):
    from lorasuite_core.io import uris

    local = tmp_path / "one-line.txt"
    _write_single_line(local, 8)
    uri = s3_endpoint.unique_uri("calibration") + "/calib.txt"
    fs, path = uris.resolve(uri)
    fs.put_file(str(local), path)
    assert read_calibration_file(uri, TOKENS) == read_calibration_file(str(local), TOKENS)
    assert read_calibration_file(uri, TOKENS) == [BLOCK[: calibration_text_cap(TOKENS)].strip()]
    with pytest.raises(LorasuiteError, match="is a directory"):
        read_calibration_file(_s3_dir(fs, uri), TOKENS)


def _s3_dir(fs, uri: str) -> str:
    from lorasuite_core.io import uris

    directory = uri.rsplit("/", 1)[0] + "/folder.txt"
    fs.pipe_file(uris.resolve(directory + "/inside.txt")[1], b"text\n")
    return directory


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_cli_reports_bad_calibration_data_on_one_line(tmp_path, capsys, kind):
    from flows.cli import main
    from lorasuite_core.testing.adapter import make_random_lora_adapter
    from lorasuite_core.testing.model import make_tiny_model_dir
    from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir

    old = make_tiny_model_dir("llama", tmp_path / "old", seed=3)
    new = upgrade_model_dir(old, tmp_path / "new", UpgradeSpec(permute_heads=True))
    adapter = make_random_lora_adapter(old, tmp_path / "adapter", rank=4, alpha=8, seed=4)
    calibration = tmp_path / "calib.txt"
    if kind == "binary":
        calibration.write_bytes(bytes(range(256)) * 16)
    else:
        calibration.mkdir()
    out = tmp_path / "out"
    code = main(["-q", "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
                 "--output", str(out), "--no-lft", "--max-calibration-tokens", "256",
                 "--calibration-data", str(calibration), "--cache-root", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("lorasuite: error: calibration data ") and str(calibration) in err[-1]
    assert ("not UTF-8" if kind == "binary" else "is a directory") in err[-1]
    assert not out.exists()
