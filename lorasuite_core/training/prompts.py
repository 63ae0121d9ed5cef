"""Unlabelled task prompts for teacher-distilled LFT (:mod:`lorasuite_core.training.distill`).

Reading
-------
:func:`read_prompts` reads a ``.txt`` file (one prompt a line), JSONL/JSON records with ``prompt``,
or math_10k records (``instruction`` + optional ``input``; any ``output``/``answer`` is ignored),
from a local path or any storage URI.  :func:`prompts_from_samples` takes the prompts of labelled
samples.  :func:`split_heldout` draws the held-out prompts (teacher agreement, the quality gate)
with ``random.Random(f"heldout:{seed}")``.  :func:`deduplicate` (the options' ``lft_dedup``) drops, before the
split, prompts equal after lower-casing and collapsing whitespace to an earlier one or to a held-out
evaluation prompt, so no prompt is trained on twice or both trained on and held out.

Prompt synthesis (:func:`synthesise_prompts`)
---------------------------------------------
The writer is the teacher's base model -- the old model with the old adapter disabled
(``SynthesisConfig.with_adapter`` False, the default): an adapter trained to answer the task answers
a list of its questions too (Qwen2.5-Coder-0.5B with its task adapter wrote 0 usable prompts in 384
candidates, "39 - 6 = 33. ... The answer is 38."), while the base model continues the list.  The
adapter only decides the targets (step 2 of :mod:`~lorasuite_core.training.distill`).  Each request
shows the writer ``k`` seed prompts drawn with ``random.Random(f"synth:{seed}:{r}")`` as a list
(``"Question: <seed>\\n"`` lines) and ends in ``"Question:"``; the writer samples the next line
(temperature, top-p; ``torch.manual_seed`` set from ``seed`` and the round before every
``generate``, so the result is a function of the seed).  A candidate is whitespace-normalised, cut
where the writer starts a next list item (``"Question:"`` inside the line), cut after its last ``?``
(a prompt must look like a question; configurable: seed prompts of which none has a ``?`` are refused before
any sampling, since nothing the writer copies from them would pass), kept within length bounds, and dropped when it
is an exact or near duplicate -- word-trigram Jaccard similarity at or above ``near_duplicate``
after lower-casing and stripping punctuation -- of any seed, any excluded (evaluation) prompt, or
any prompt already accepted.  Rounds repeat until ``n`` prompts are kept or
``ceil(candidates_per_prompt · n / batch_size)`` rounds (or ``max_rounds``) have run: the budget
grows with ``n``, since a small teacher may keep only one candidate in ten.

Models and adapters are read from safetensors only; ``trust_remote_code`` is False.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.io import textfile
from lorasuite_core.io.uris import redact_uri
from lorasuite_core.training.evaluation import model_eos_ids
from lorasuite_core.training.task_data import Sample, format_prompt

logger = logging.getLogger(__name__)

PROMPT_SUFFIXES = (".txt", ".jsonl", ".json")
_LIST_LEAD = "Question:"
_WORD = re.compile(r"[a-z0-9]+")


# --------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Prompt:
    """An unlabelled task prompt: math_10k ``instruction`` and optional ``input``; ``task``: the registered skill
    (:mod:`lorasuite_core.training.skills`) whose stop rule, budget and scorer apply to it (None: the final
    number, as for ``builtin:`` and files)."""

    instruction: str
    input: str = ""
    task: str | None = None

    @property
    def text(self) -> str:
        """The prompt's own words (instruction, then input), for de-duplication and overlap checks."""
        return f"{self.instruction}\n{self.input}" if self.input.strip() else self.instruction

    def sample(self, output: str = "", answer: str = "") -> Sample:
        return Sample(instruction=self.instruction, input=self.input, output=output, answer=answer, task=self.task)

    def formatted(self) -> str:
        """The built-in template (:func:`format_prompt`) around this prompt."""
        return format_prompt(self.sample())


def prompts_from_samples(samples: Iterable[Sample]) -> list[Prompt]:
    """The prompts of labelled samples (their outputs and answers dropped; their task kept)."""
    return [Prompt(s.instruction, s.input, s.task) for s in samples]


def load_prompts(ref: str, limit: int | None, seed: int) -> list[Prompt]:
    """Unlabelled prompts from a spec: a prompt file (.txt / .jsonl / .json, math_10k records included, local or a
    URI: :func:`read_prompts`), or ``builtin:<split>`` / ``task:NAME:SPLIT[:COUNT]`` (the samples' prompts, drawn
    with ``seed``; their task kept)."""
    from lorasuite_core.training.samples import BUILTIN, load_samples
    from lorasuite_core.training.skills import TASK

    if ref.startswith((BUILTIN, TASK)):
        return prompts_from_samples(load_samples(ref, limit, split="train", seed=seed))
    return read_prompts(ref, limit)


def _record_task(record: dict, where: str) -> str | None:
    from lorasuite_core.training.skills import SKILLS, known_tasks

    task = record.get("task")
    if task is not None and task not in SKILLS:
        raise LorasuiteError(f"{where}: unknown task {task!r}; known tasks: {known_tasks()}")
    return task


def _record_prompt(record: Any, where: str) -> Prompt:
    if not isinstance(record, dict):
        raise LorasuiteError(f"{where} is not a JSON object")
    if record.get("prompt") is not None and str(record["prompt"]).strip():
        return Prompt(str(record["prompt"]).strip(), task=_record_task(record, where))
    if record.get("instruction") is not None and str(record["instruction"]).strip():
        extra = record.get("input")
        return Prompt(str(record["instruction"]).strip(), "" if extra is None else str(extra).strip(),
                      _record_task(record, where))
    raise LorasuiteError(f"{where} has neither a 'prompt' nor an 'instruction' field")


PROMPT_LINE_LIMIT = 1 << 20   # characters of one prompt line / JSONL record


def _stream_prompts(handle, suffix: str, what: str) -> Iterator[Prompt]:
    """Prompts of an open file by its suffix (``.txt``, ``.jsonl``, ``.json``); LorasuiteError names the line."""
    if suffix == ".json":
        try:
            records = json.loads(handle.read())
        except json.JSONDecodeError as exc:
            raise LorasuiteError(f"{what}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
        if not isinstance(records, list):
            raise LorasuiteError(f"{what}: a .json prompt file must hold a list of objects")
        yield from (_record_prompt(r, f"{what}: record {i}") for i, r in enumerate(records))
    elif suffix == ".jsonl":
        for number, record in textfile.jsonl_records(handle, PROMPT_LINE_LIMIT, what):
            yield _record_prompt(record, f"{what}: line {number}")
    else:
        for number, line, whole in textfile.lines(handle, PROMPT_LINE_LIMIT, what):
            if not whole:
                raise LorasuiteError(f"{what}: line {number} is longer than {PROMPT_LINE_LIMIT} characters")
            if line.strip():
                yield Prompt(line.strip())


def read_prompts(ref: str, limit: int | None = None) -> list[Prompt]:
    """Unlabelled prompts from a local path or URI: ``.txt`` (one a line), ``.jsonl`` or ``.json``.

    Records carry ``prompt``, or math_10k ``instruction`` (+ ``input``), and optionally ``task`` (a registered
    skill's name); other fields are ignored.
    ``.txt`` and ``.jsonl`` are streamed and reading stops after ``limit`` prompts. Every problem is a
    :class:`LorasuiteError` naming the file (and the line).
    """
    what = f"prompt file {redact_uri(str(ref))}"
    suffix = next((s for s in PROMPT_SUFFIXES if str(ref).lower().endswith(s)), None)
    if suffix is None:
        raise LorasuiteError(f"{what}: use .txt (one prompt a line), .jsonl or .json")
    with textfile.open_text(ref, what) as handle:
        prompts = list(itertools.islice(_stream_prompts(handle, suffix, what), limit))
    if not prompts:
        raise LorasuiteError(f"{what} holds no prompts")
    return prompts


def _plain_key(prompt: Prompt) -> str:
    return " ".join(prompt.text.lower().split())


def deduplicate(prompts: Sequence[Prompt], exclude: Iterable[Prompt] = ()) -> list[Prompt]:
    """``prompts`` in order without exact duplicates after lower-casing and collapsing whitespace (of its text,
    instruction and input): the first of equal prompts is kept, and none equal to an ``exclude``d (held-out)
    prompt.  Run before :func:`split_heldout`, so no held-out prompt is also trained on."""
    seen = {_plain_key(p) for p in exclude}
    kept = []
    for prompt in prompts:
        key = _plain_key(prompt)
        if key not in seen:
            seen.add(key)
            kept.append(prompt)
    return kept


def split_heldout(prompts: Sequence[Prompt], n_heldout: int, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """``(train, heldout)``: ``n_heldout`` prompts drawn with ``random.Random(seed)``, the rest in order."""
    if not 0 < n_heldout < len(prompts):
        raise ValueError(f"n_heldout must be in [1, {len(prompts) - 1}] for {len(prompts)} prompts, got {n_heldout}")
    chosen = set(random.Random(f"heldout:{seed}").sample(range(len(prompts)), n_heldout))
    return ([p for i, p in enumerate(prompts) if i not in chosen], [p for i, p in enumerate(prompts) if i in chosen])


# --------------------------------------------------------------------------- near duplicates

def normalise_text(text: str) -> str:
    """Lower-cased words and numbers only, single-spaced."""
    return " ".join(_WORD.findall(text.lower()))


def _shingles(text: str, k: int = 3) -> frozenset[tuple[str, ...]]:
    words = normalise_text(text).split()
    if len(words) < k:
        return frozenset({tuple(words)}) if words else frozenset()
    return frozenset(tuple(words[i:i + k]) for i in range(len(words) - k + 1))


class NearDuplicateIndex:
    """Exact (normalised) and near (word-trigram Jaccard >= ``threshold``) duplicate look-up."""

    def __init__(self, threshold: float = 0.7, texts: Iterable[str] = ()):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._exact: set[str] = set()
        self._sets: list[frozenset] = []
        self._by_shingle: dict[tuple[str, ...], list[int]] = {}
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        self._exact.add(normalise_text(text))
        shingles = _shingles(text)
        for shingle in shingles:
            self._by_shingle.setdefault(shingle, []).append(len(self._sets))
        self._sets.append(shingles)

    def contains(self, text: str) -> bool:
        if normalise_text(text) in self._exact:
            return True
        shingles = _shingles(text)
        candidates = {i for s in shingles for i in self._by_shingle.get(s, ())}
        return any(len(shingles & self._sets[i]) / len(shingles | self._sets[i]) >= self.threshold
                   for i in candidates)



# --------------------------------------------------------------------------- prompt synthesis

@dataclass(frozen=True)
class SynthesisConfig:
    """How :func:`synthesise_prompts` asks, samples and filters."""

    shots: int = 3
    batch_size: int = 16
    max_new_tokens: int = 96
    temperature: float = 0.8
    top_p: float = 0.95
    candidates_per_prompt: int = 12   # sampling budget: rounds = ceil(this x n / batch_size) ...
    max_rounds: int | None = None     # ... unless given
    min_chars: int = 20
    max_chars: int = 500
    require_question: bool = True
    near_duplicate: float = 0.7
    with_adapter: bool = False        # write with the teacher's adapter enabled (default: its base model)

    def __post_init__(self) -> None:
        for name in ("shots", "batch_size", "max_new_tokens", "candidates_per_prompt", "min_chars", "max_chars",
                     "max_rounds"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"SynthesisConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")


def fewshot_request(shots: Sequence[Prompt]) -> str:
    """The seed prompts as a list, one a line, ending where the teacher writes the next one."""
    return "".join(f"{_LIST_LEAD} {' '.join(p.text.split())}\n" for p in shots) + _LIST_LEAD


def clean_candidate(text: str, config: SynthesisConfig) -> str | None:
    """The first line, whitespace-normalised, up to a next list item, cut after its last '?'; None when it fails
    a filter."""
    line = " ".join(text.split("\n", 1)[0].split()).split(_LIST_LEAD, 1)[0].strip()
    if config.require_question:
        if "?" not in line:
            return None
        line = line[: line.rindex("?") + 1]
    if not config.min_chars <= len(line) <= config.max_chars:
        return None
    return line


@torch.no_grad()
def _sample_continuations(model, tokenizer, requests: Sequence[str], config: SynthesisConfig, torch_seed: int) -> list[str]:
    """One sampled continuation (up to its first newline) per request; seeded, so reproducible."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    encoded = tokenizer(list(requests), return_tensors="pt", padding=True, add_special_tokens=True).to(device)
    generation = GenerationConfig(max_new_tokens=config.max_new_tokens, do_sample=True,
                                  temperature=config.temperature, top_p=config.top_p, top_k=0,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=model_eos_ids(model, tokenizer),
                                  stop_strings=["\n"])
    torch.manual_seed(torch_seed)
    plain = not config.with_adapter and hasattr(model, "disable_adapter")   # a PeftModel: write with its base
    with model.disable_adapter() if plain else contextlib.nullcontext():
        output = model.generate(**encoded, generation_config=generation, tokenizer=tokenizer)
    return tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def check_seed_questions(seeds: Sequence[Prompt]) -> None:
    """LorasuiteError when none of ``seeds`` has a '?': synthesis keeps only questions, so it could only spend its
    sampling budget (the migration's pre-run check calls this too, before any analysis)."""
    if not any("?" in s.text for s in seeds):
        raise LorasuiteError(f"prompt synthesis keeps only questions (a line with '?') and none of the {len(seeds)} "
                             "seed prompts is one; give unlabelled prompts instead (--lft-prompts)")


def synthesise_prompts(model, tokenizer, seeds: Sequence[Prompt | str], n: int, *, seed: int = 0,
                       exclude: Iterable[Prompt | str] = (), config: SynthesisConfig | None = None) -> list[Prompt]:
    """``n`` new prompts in the style of ``seeds`` (deterministic by ``seed``), written by ``model`` -- the
    teacher -- with its adapter disabled unless ``config.with_adapter`` (the module docstring).

    None is an exact or near duplicate of a seed, of an ``exclude``d (evaluation) prompt, or of
    another.  Fewer than ``n`` after ``max_rounds`` is logged; none at all is a LorasuiteError.  The new
    prompts carry the seeds' task when all seeds share one.
    """
    config = config or SynthesisConfig()
    seeds = [s if isinstance(s, Prompt) else Prompt(str(s)) for s in seeds]
    if not seeds or n < 1:
        raise ValueError(f"prompt synthesis needs >= 1 seed prompt and n >= 1, got {len(seeds)} seeds, n={n}")
    if config.require_question:
        check_seed_questions(seeds)
    tasks = {s.task for s in seeds}
    task = tasks.pop() if len(tasks) == 1 else None
    seen = NearDuplicateIndex(config.near_duplicate, [s.text for s in seeds])
    for item in exclude:
        seen.add(item.text if isinstance(item, Prompt) else str(item))
    kept: list[Prompt] = []
    rounds = config.max_rounds or math.ceil(config.candidates_per_prompt * n / config.batch_size)
    for round_ in range(rounds):
        if round_ and round_ % 10 == 0:
            logger.info("prompt synthesis: %d of %d prompts after %d of at most %d rounds", len(kept), n, round_, rounds)
        rng = random.Random(f"synth:{seed}:{round_}")
        requests = [fewshot_request(rng.sample(seeds, min(config.shots, len(seeds))))
                    for _ in range(config.batch_size)]
        for raw in _sample_continuations(model, tokenizer, requests, config, seed * 1_000_003 + round_):
            candidate = clean_candidate(raw, config)
            if candidate is None or seen.contains(candidate):
                continue
            seen.add(candidate)
            kept.append(Prompt(candidate, task=task))
            if len(kept) == n:
                return kept
    if not kept:
        raise LorasuiteError(f"the teacher's model wrote no usable prompt from {len(seeds)} seed prompts in "
                             f"{rounds} rounds; give unlabelled prompts instead")
    logger.warning("prompt synthesis kept %d of the %d prompts asked for after %d rounds", len(kept), n, rounds)
    return kept


# --------------------------------------------------------------------------- token map and examples
