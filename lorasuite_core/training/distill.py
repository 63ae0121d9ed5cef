"""Teacher-distilled light fine-tuning: LFT without labelled data (Trans-LoRA style).

Roles
-----
* **Teacher** ``T``: the old base model + the old (source) adapter -- the behaviour to keep.
* **Student** ``S``: the new base model + the migrated adapter; only its LoRA A/B matrices train.

Data flow
---------
1. Prompts ``x_1 .. x_n`` without answers: :func:`read_prompts` reads a ``.txt`` file (one prompt a
   line), JSONL/JSON records with ``prompt``, or math_10k records (``instruction`` + optional
   ``input``; any ``output``/``answer`` is ignored), from a local path or any storage URI.  Or
   :func:`synthesise_prompts` has the teacher's base model write new prompts in the style of a few
   seeds (below).
2. Targets: the teacher's greedy completion ``y_i = argmax-decode T(. | P(x_i))`` with the built-in
   prompt template ``P`` (:func:`~lorasuite_core.training.task_data.format_prompt`, the template the
   adapters were trained with), cut as evaluation scores it: at the first stop marker, and right
   after the first complete "The answer is N" sentence (its period kept).  :func:`greedy_completions`
   keeps the teacher's *token ids* for exactly that text, not only the text: decoding then
   re-encoding is lossy (byte tokens of partial UTF-8 characters decode to U+FFFD).
3. Sequence-level distillation (Kim & Rush 2016): the student is trained like labelled LFT on
   ``(P(x_i), y_i + EOS)`` -- next-token cross-entropy over the completion tokens only, with the
   LFT loop of :mod:`lorasuite_core.training.train`.  It needs no shared vocabulary.
4. Token-level KL, where the vocabularies coincide or map through the shared tokens.  A
   :class:`TokenMap` is a list of pairs ``(t_k, s_k)``, ``k in S``: the identity over the whole
   vocabulary when both tokenizers have the same vocabulary, else the shared-token pairs of
   :mod:`lorasuite_core.transfer.vocab` (matched by the bytes they spell; the pipeline passes its
   vocabulary stage) plus ``(EOS_T, EOS_S)``.  The student's target is what the student itself
   would write: with the identity map the teacher's ids, otherwise the student tokenizer's own
   encoding of the completion text (mapping the teacher's ids token by token would give the
   student a segmentation its encoder never produces -- "5" spelled as the byte token "<0x35>" --
   and train it on positions it never sees when it generates).  Both sides are then compared
   where they predict the same event: student position ``j`` (its next token ``s_j`` starts at
   byte offset ``c`` of the completion) is *aligned* with teacher position ``i`` when teacher
   token ``t_i`` starts at the same offset and maps to ``s_j`` -- both have read the same text and
   both put the same piece next -- and the two EOS positions are aligned (byte offsets from
   :func:`lorasuite_core.models.tokens.token_surfaces`; where the two spellings part -- a generated
   byte that is not valid UTF-8 re-encodes as U+FFFD -- nothing after it compares).  With the
   identity map every position is aligned.  The contexts still differ in segmentation ("15" read
   as one token or two), so across tokenizers the term is an approximation; it is exact where
   both segment alike.  At every aligned pair ``(i, j)``, with teacher logits ``a`` (row ``i``) and student
   logits ``b`` (row ``j``) restricted to ``S`` and temperature ``tau``::

       p = softmax(a[t_S] / tau),   q = softmax(b[s_S] / tau)
       KL_ij = sum_k p_k (log p_k - log q_k)
       loss = CE + lambda * tau^2 * mean_(i,j) KL_ij        (lambda = ``kl_weight``)

   (Hinton et al.'s ``tau^2`` keeps the gradient scale independent of ``tau``.)  Both
   distributions are renormalised over ``S``, so tokens only one side has (added tokens, padding
   rows, other specials) take no part.  Teacher logits are computed on the fly, one micro-batch at
   a time with the teacher resident and frozen (no ``n x len x V`` cache), and only at labelled
   positions (:func:`~lorasuite_core.training.train.labelled_logits`).  Without a map the KL term is
   skipped with a logged reason.
5. Agreement: :func:`answers_agree` compares final answers -- the last number of the scored text,
   compared numerically (:func:`~lorasuite_core.training.evaluation.answers_match`), or, where
   either side holds no number, the whitespace-normalised scored text itself.
   :func:`teacher_agreement` is the fraction of prompts whose final answers agree.
   :func:`distill` reports it on held-out prompts before and after training.

Prompt synthesis (:func:`synthesise_prompts`)
---------------------------------------------
The writer is the teacher's base model -- the old model with the old adapter disabled
(``SynthesisConfig.with_adapter`` False, the default): an adapter trained to answer the task answers
a list of its questions too (Qwen2.5-Coder-0.5B with its task adapter wrote 0 usable prompts in 384
candidates, "39 - 6 = 33. ... The answer is 38."), while the base model continues the list.  The
adapter only decides the targets (step 2).  Each request shows the writer ``k`` seed prompts drawn
with ``random.Random(f"synth:{seed}:{r}")`` as a list (``"Question: <seed>\\n"`` lines) and ends in
``"Question:"``; the writer samples the next line (temperature, top-p; ``torch.manual_seed`` set from
``seed`` and the round before every ``generate``, so the result is a function of the seed).  A
candidate is whitespace-normalised, cut where the writer starts a next list item (``"Question:"``
inside the line), cut after its last ``?`` (a prompt must look like a question; configurable), kept
within length bounds,
and dropped when it is an exact or near duplicate -- word-trigram Jaccard similarity at or above
``near_duplicate`` after lower-casing and stripping punctuation -- of any seed, any excluded
(evaluation) prompt, or any prompt already accepted.  Rounds repeat until ``n`` prompts are kept or
``ceil(candidates_per_prompt · n / batch_size)`` rounds (or ``max_rounds``) have run: the
budget grows with ``n``, since a small teacher may keep only one candidate in ten.

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.io import storage, textfile
from lorasuite_core.models.tokens import token_surfaces
from lorasuite_core.training.evaluation import (ANSWER_SENTENCE, STOP_MARKERS, answers_match, extract_final_number,
                                                generation_finished, load_for_generation, model_eos_ids,
                                                truncate_generation)
from lorasuite_core.training.task_data import Sample, format_prompt
from lorasuite_core.training.train import (TrainConfig, TrainResult, collate,
                                           finetune_examples, labelled_logits,
                                           load_for_light_finetune, load_tokenizer)

logger = logging.getLogger(__name__)

MODE_SEQUENCE = "sequence"
MODE_KL = "sequence+token_kl"
PROMPT_SUFFIXES = (".txt", ".jsonl", ".json")
_LIST_LEAD = "Question:"
_WORD = re.compile(r"[a-z0-9]+")


# --------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Prompt:
    """An unlabelled task prompt: math_10k ``instruction`` and optional ``input``."""

    instruction: str
    input: str = ""

    @property
    def text(self) -> str:
        """The prompt's own words (instruction, then input), for de-duplication and overlap checks."""
        return f"{self.instruction}\n{self.input}" if self.input.strip() else self.instruction

    def sample(self, output: str = "", answer: str = "") -> Sample:
        return Sample(instruction=self.instruction, input=self.input, output=output, answer=answer)

    def formatted(self) -> str:
        """The built-in template (:func:`format_prompt`) around this prompt."""
        return format_prompt(self.sample())


def prompts_from_samples(samples: Iterable[Sample]) -> list[Prompt]:
    """The prompts of labelled samples (their outputs and answers dropped)."""
    return [Prompt(s.instruction, s.input) for s in samples]


def _record_prompt(record: Any, where: str) -> Prompt:
    if not isinstance(record, dict):
        raise LorasuiteError(f"{where} is not a JSON object")
    if record.get("prompt") is not None and str(record["prompt"]).strip():
        return Prompt(str(record["prompt"]).strip())
    if record.get("instruction") is not None and str(record["instruction"]).strip():
        extra = record.get("input")
        return Prompt(str(record["instruction"]).strip(), "" if extra is None else str(extra).strip())
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

    Records carry ``prompt``, or math_10k ``instruction`` (+ ``input``); other fields are ignored.
    ``.txt`` and ``.jsonl`` are streamed and reading stops after ``limit`` prompts. Every problem is a
    :class:`LorasuiteError` naming the file (and the line).
    """
    what = f"prompt file {storage.redact_uri(str(ref))}"
    suffix = next((s for s in PROMPT_SUFFIXES if str(ref).lower().endswith(s)), None)
    if suffix is None:
        raise LorasuiteError(f"{what}: use .txt (one prompt a line), .jsonl or .json")
    with textfile.open_text(ref, what) as handle:
        prompts = list(itertools.islice(_stream_prompts(handle, suffix, what), limit))
    if not prompts:
        raise LorasuiteError(f"{what} holds no prompts")
    return prompts


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


# --------------------------------------------------------------------------- loading and generation

def scored_text(text: str) -> str:
    """The part of a generation evaluation scores: cut at a stop marker, and after "answer is N" (+ its period)."""
    cut = min((text.find(m) for m in STOP_MARKERS if m in text), default=len(text))
    text = text[:cut]
    match = ANSWER_SENTENCE.search(text)
    if match:
        end = match.end() + (1 if text[match.end():match.end() + 1] == "." else 0)
        text = text[:end]
    return text.rstrip()


@dataclass(frozen=True)
class Completion:
    """A scored generation: its text and the generator's token ids for exactly that text (no EOS)."""

    text: str
    ids: tuple[int, ...]


def _cut_ids(tokenizer, ids: list[int], text: str) -> tuple[int, ...]:
    """Shortest prefix of ``ids`` whose decoding covers ``text`` (decoding is not monotone: scan)."""
    for k in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True).rstrip()) >= len(text):
            return tuple(ids[:k])
    return tuple(ids)


def _completion(tokenizer, row: list[int], stop_ids: set[int]) -> Completion:
    end = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
    ids = row[:end]
    text = scored_text(tokenizer.decode(ids, skip_special_tokens=True))
    return Completion(text=text, ids=_cut_ids(tokenizer, ids, text))


def greedy_completions(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int = 128,
                       batch_size: int = 16, adapter_names: Sequence[str] | None = None) -> list[Completion]:
    """Greedy completions of ``prompts`` in the built-in template: evaluation's greedy loop
    (:func:`~lorasuite_core.training.evaluation.greedy_generate_ids`: length-sorted batches, KV cache,
    a row leaves its batch once its text is fully scored), cut and kept with their token ids.
    ``adapter_names``: one per prompt, for a model holding several adapters (mixed-adapter batches)."""
    from lorasuite_core.training.evaluation import greedy_generate_ids

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    eos = model_eos_ids(model, tokenizer)
    stop_ids = set(eos) | {tokenizer.pad_token_id}
    rows = greedy_generate_ids(model, tokenizer, [p.formatted() for p in prompts], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, stop=generation_finished, eos_token_ids=eos,
                               adapter_names=adapter_names)
    return [_completion(tokenizer, row, stop_ids) for row in rows]


def teacher_completions(old_model_dir: str | Path, prompts_by_adapter: dict[str, tuple[str | Path, Sequence[Prompt]]],
                        *, max_new_tokens: int = 128, batch_size: int = 16, dtype: str = "auto",
                        device: str = "auto") -> dict[str, list[Completion]]:
    """Every teacher's greedy completions at once: name -> (adapter directory, prompts) of adapters of one old
    model; one base model holds all adapters and their prompts share batches (PEFT mixed-adapter batches).
    Equal to :func:`greedy_completions` with each adapter loaded alone."""
    from lorasuite_core.training.evaluation import load_adapters_for_generation

    model, tokenizer = load_adapters_for_generation(
        old_model_dir, {name: adapter for name, (adapter, _) in prompts_by_adapter.items()}, dtype=dtype, device=device)
    prompts = [p for _, ps in prompts_by_adapter.values() for p in ps]
    names = [name for name, (_, ps) in prompts_by_adapter.items() for _ in ps]
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     adapter_names=names)
    result: dict[str, list[Completion]] = {name: [] for name in prompts_by_adapter}
    for name, completion in zip(names, completions, strict=True):
        result[name].append(completion)
    return result


# --------------------------------------------------------------------------- agreement

def _text_of(item: Completion | str) -> str:
    return item.text if isinstance(item, Completion) else item


def answers_agree(student: Completion | str, teacher: Completion | str) -> bool:
    """Same final number (numerically), or -- where either has none -- the same normalised scored text."""
    s_text, t_text = truncate_generation(_text_of(student)), truncate_generation(_text_of(teacher))
    s_num, t_num = extract_final_number(s_text), extract_final_number(t_text)
    if s_num is None or t_num is None:
        return s_num is None and t_num is None and " ".join(s_text.split()) == " ".join(t_text.split())
    return answers_match(s_num, t_num)


def teacher_agreement(student: Sequence[Completion | str], teacher: Sequence[Completion | str]) -> float:
    """Fraction of prompts whose student and teacher final answers agree (:func:`answers_agree`)."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student completions for {len(teacher)} teacher completions")
    if not teacher:
        raise ValueError("teacher agreement needs at least one prompt")
    return sum(answers_agree(s, t) for s, t in zip(student, teacher, strict=True)) / len(teacher)


def accuracy(completions: Sequence[Completion | str], answers: Sequence[str]) -> float:
    """Exact-match accuracy of the final numbers against gold ``answers``."""
    if len(completions) != len(answers) or not answers:
        raise ValueError(f"{len(completions)} completions for {len(answers)} answers (need >= 1 of each, equal)")
    return sum(answers_match(extract_final_number(truncate_generation(_text_of(c))), a)
               for c, a in zip(completions, answers, strict=True)) / len(answers)


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


def synthesise_prompts(model, tokenizer, seeds: Sequence[Prompt | str], n: int, *, seed: int = 0,
                       exclude: Iterable[Prompt | str] = (), config: SynthesisConfig | None = None) -> list[Prompt]:
    """``n`` new prompts in the style of ``seeds`` (deterministic by ``seed``), written by ``model`` -- the
    teacher -- with its adapter disabled unless ``config.with_adapter`` (the module docstring).

    None is an exact or near duplicate of a seed, of an ``exclude``d (evaluation) prompt, or of
    another.  Fewer than ``n`` after ``max_rounds`` is logged; none at all is a LorasuiteError.
    """
    config = config or SynthesisConfig()
    seeds = [s if isinstance(s, Prompt) else Prompt(str(s)) for s in seeds]
    if not seeds or n < 1:
        raise ValueError(f"prompt synthesis needs >= 1 seed prompt and n >= 1, got {len(seeds)} seeds, n={n}")
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
            kept.append(Prompt(candidate))
            if len(kept) == n:
                return kept
    if not kept:
        raise LorasuiteError(f"the teacher's model wrote no usable prompt from {len(seeds)} seed prompts in "
                             f"{rounds} rounds; give unlabelled prompts instead")
    logger.warning("prompt synthesis kept %d of the %d prompts asked for after %d rounds", len(kept), n, rounds)
    return kept


# --------------------------------------------------------------------------- token map and examples

@dataclass(frozen=True)
class TokenMap:
    """Pairs ``(teacher id, student id)`` of the shared vocabulary over which the KL term is taken."""

    teacher_ids: torch.Tensor  # (n,) int64
    student_ids: torch.Tensor  # (n,) int64, same order
    identity: bool = False

    def __post_init__(self) -> None:
        if self.teacher_ids.shape != self.student_ids.shape or self.teacher_ids.dim() != 1:
            raise ValueError(f"token map: teacher ids {tuple(self.teacher_ids.shape)} and student ids "
                             f"{tuple(self.student_ids.shape)} must be 1-D of equal length")
        if len(self.teacher_ids) == 0:
            raise ValueError("token map is empty")
        object.__setattr__(self, "_to_student", dict(zip(self.teacher_ids.tolist(), self.student_ids.tolist())))

    def __len__(self) -> int:
        return len(self.teacher_ids)

    def student_of(self, teacher_id: int) -> int | None:
        """The student id paired with ``teacher_id`` (None when it has no partner)."""
        return self._to_student.get(teacher_id)  # type: ignore[attr-defined]

    @classmethod
    def between(cls, teacher_tokenizer, student_tokenizer,
                shared: tuple[Sequence[int], Sequence[int]] | None = None) -> TokenMap | None:
        """Identity for identical vocabularies; else ``shared`` (teacher ids, student ids) + the EOS pair; else None."""
        if teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab():
            ids = torch.arange(len(teacher_tokenizer), dtype=torch.long)
            return cls(ids, ids.clone(), identity=True)
        if shared is None:
            return None
        pairs = dict(zip((int(i) for i in shared[0]), (int(i) for i in shared[1])))
        if len(pairs) != len(shared[0]) or len(shared[0]) != len(shared[1]):
            raise ValueError(f"shared vocabulary: {len(shared[0])} teacher ids (distinct {len(pairs)}) for "
                             f"{len(shared[1])} student ids")
        pairs[teacher_tokenizer.eos_token_id] = student_tokenizer.eos_token_id
        teacher, student = zip(*sorted(pairs.items()))
        return cls(torch.tensor(teacher, dtype=torch.long), torch.tensor(student, dtype=torch.long))


def _starts(surfaces: Sequence[bytes | None]) -> list[int] | None:
    """Byte offset at which each token starts (None when a token has no byte spelling)."""
    offsets, at = [], 0
    for surface in surfaces:
        if surface is None:
            return None
        offsets.append(at)
        at += len(surface)
    return offsets


def aligned_positions(teacher_tokenizer, teacher_ids: Sequence[int], student_tokenizer, student_ids: Sequence[int],
                      token_map: TokenMap) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` of completion positions (teacher ``i``, student ``j``) that predict the same event: the
    same byte offset, the same bytes before it, and mapped tokens; plus the EOS pair ``(len(teacher_ids),
    len(student_ids))`` when both spell the same bytes.  Where the two spellings part (a generated byte that
    is not valid UTF-8 re-encodes as U+FFFD), the positions after it do not compare."""
    eos = (len(teacher_ids), len(student_ids))
    if token_map.identity and list(teacher_ids) == list(student_ids):
        return [(j, j) for j in range(len(student_ids))] + [eos]
    t_surfaces = token_surfaces(teacher_tokenizer, teacher_ids)
    s_surfaces = token_surfaces(student_tokenizer, student_ids)
    t_starts, s_starts = _starts(t_surfaces), _starts(s_surfaces)
    if t_starts is None or s_starts is None:
        return []
    t_text, s_text = b"".join(t_surfaces), b"".join(s_surfaces)  # type: ignore[arg-type]
    common = next((k for k, (a, b) in enumerate(zip(t_text, s_text)) if a != b), min(len(t_text), len(s_text)))
    teacher_at = dict(zip(t_starts, range(len(t_starts))))
    pairs = [(teacher_at[c], j) for j, c in enumerate(s_starts)
             if c in teacher_at and c + len(s_surfaces[j]) <= common  # type: ignore[arg-type]
             and token_map.student_of(teacher_ids[teacher_at[c]]) == student_ids[j]]
    return pairs + ([eos] if t_text == s_text else [])


def distillation_examples(student_tokenizer, teacher_tokenizer, prompts: Sequence[Prompt],
                          completions: Sequence[Completion], max_length: int,
                          token_map: TokenMap | None) -> list[dict[str, Any]]:
    """Training examples ``prompt + target + EOS`` (labels -100 over the prompt), as LFT builds them.

    The target is the teacher's ids under the identity map, else the student's own encoding of the
    completion text.  With a map, examples with an aligned position also carry ``"teacher"`` (the
    teacher's prompt ids followed by its completion ids + EOS, labelled over the completion) and
    ``"kl_pairs"``: (teacher row, student row) among each side's labelled rows, inside ``max_length``.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} teacher completions")
    identity = token_map is not None and token_map.identity
    examples = []
    for prompt, completion in zip(prompts, completions, strict=True):
        target = list(completion.ids) if identity else \
            student_tokenizer(completion.text, add_special_tokens=False)["input_ids"]
        prompt_ids = student_tokenizer(prompt.formatted(), add_special_tokens=True)["input_ids"]
        output_ids = list(target) + [student_tokenizer.eos_token_id]
        labels = ([-100] * len(prompt_ids) + output_ids)[:max_length]
        n_labelled = sum(label != -100 for label in labels)
        if n_labelled == 0:
            continue
        example: dict[str, Any] = {"input_ids": (prompt_ids + output_ids)[:max_length], "labels": labels}
        if token_map is not None:
            t_prompt = teacher_tokenizer(prompt.formatted(), add_special_tokens=True)["input_ids"]
            t_output = (list(completion.ids) + [teacher_tokenizer.eos_token_id])[:max(max_length - len(t_prompt), 0)]
            pairs = [(i, j) for i, j in aligned_positions(teacher_tokenizer, completion.ids, student_tokenizer,
                                                          target, token_map)
                     if i < len(t_output) and j < n_labelled]
            if pairs:
                example["teacher"] = {"input_ids": t_prompt + t_output, "labels": [-100] * len(t_prompt) + t_output}
                example["kl_pairs"] = pairs
        examples.append(example)
    if len(examples) < len(prompts):
        logger.warning("dropped %d distillation prompts that fill max_length=%d tokens", len(prompts) - len(examples),
                       max_length)
    if not examples:
        raise ValueError(f"no trainable distillation example: all {len(prompts)} prompts fill max_length={max_length}")
    return examples


def restricted_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, token_map: TokenMap,
                  temperature: float = 1.0) -> torch.Tensor:
    """``tau^2 * mean_rows KL(p || q)`` with ``p``, ``q`` the softmaxes over the shared vocabulary (float32)."""
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"KL rows: student {student_logits.shape[0]}, teacher {teacher_logits.shape[0]}")
    log_q = torch.log_softmax(student_logits[:, token_map.student_ids.to(student_logits.device)].float() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits[:, token_map.teacher_ids.to(teacher_logits.device)].float() / temperature, -1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return kl * temperature**2


def distillation_loss(teacher, token_map: TokenMap | None, *, kl_weight: float, temperature: float,
                      student_pad_id: int, teacher_pad_id: int):
    """``loss_fn(model, chunk)``: CE over the targets + ``kl_weight`` x restricted KL on the aligned examples."""

    def loss_fn(model, chunk: list[dict[str, Any]]) -> torch.Tensor:
        device = next(p for p in model.parameters()).device
        batch = {k: v.to(device) for k, v in collate(chunk, student_pad_id).items()}
        logits, targets = labelled_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        aligned = [k for k, example in enumerate(chunk) if "teacher" in example]
        if teacher is None or token_map is None or kl_weight == 0 or not aligned:
            return loss
        # labelled rows are in (example, position) order: example k's rows start at the running count
        s_start = [0] + (batch["labels"][:, 1:] != -100).sum(dim=1).cumsum(0).tolist()
        t_start = [0]
        for k in aligned:
            t_start.append(t_start[-1] + sum(label != -100 for label in chunk[k]["teacher"]["labels"][1:]))
        s_rows = [s_start[k] + j for k in aligned for _, j in chunk[k]["kl_pairs"]]
        t_rows = [t_start[n] + i for n, k in enumerate(aligned) for i, _ in chunk[k]["kl_pairs"]]
        teacher_batch = {k: v.to(device) for k, v in collate([chunk[k]["teacher"] for k in aligned],
                                                             teacher_pad_id).items()}
        with torch.no_grad():
            teacher_logits, _ = labelled_logits(teacher, teacher_batch)
        return loss + kl_weight * restricted_kl(logits[s_rows], teacher_logits[t_rows], token_map, temperature)

    return loss_fn


# --------------------------------------------------------------------------- training

@dataclass
class DistillTraining:
    """Outcome of :func:`distill_finetune`."""

    mode: str
    n_prompts: int
    kl_examples: int
    kl_positions: int   # aligned (teacher, student) positions the KL term compares
    target_positions: int   # labelled student positions (completion tokens + EOS)
    kl_note: str
    training: TrainResult

    def to_dict(self) -> dict[str, Any]:
        training = self.training.to_dict()
        training.pop("out_dir", None)
        return {"mode": self.mode, "n_prompts": self.n_prompts, "kl_examples": self.kl_examples,
                "kl_positions": self.kl_positions, "target_positions": self.target_positions,
                "kl_note": self.kl_note, "training": training}


def distill_finetune(new_model_dir: str | Path, migrated_adapter_dir: str | Path, prompts: Sequence[Prompt],
                     teacher_completions: Sequence[Completion], out_dir: str | Path, *,
                     config: TrainConfig, teacher=None, teacher_tokenizer=None,
                     token_map: TokenMap | None = None, kl_weight: float = 1.0,
                     kl_temperature: float = 1.0) -> DistillTraining:
    """Train the migrated adapter on ``(prompt, teacher completion)`` pairs, + token KL where ``token_map`` allows.

    ``teacher``/``teacher_tokenizer``: the loaded teacher (needed for the KL term; the tokenizer also
    for aligning). Without them, or without ``token_map``, or with ``kl_weight == 0``: sequence-level only.
    """
    if kl_weight < 0 or kl_temperature <= 0:
        raise ValueError(f"need kl_weight >= 0 and kl_temperature > 0, got {kl_weight}, {kl_temperature}")
    torch.manual_seed(config.seed)
    student, tokenizer = load_for_light_finetune(new_model_dir, migrated_adapter_dir, dtype=config.dtype,
                                                 device=config.device)
    mapping = token_map if teacher_tokenizer is not None else None
    examples = distillation_examples(tokenizer, teacher_tokenizer or tokenizer, prompts, teacher_completions,
                                     config.max_length, mapping)
    aligned = sum("teacher" in e for e in examples)
    note = _kl_note(teacher, mapping, kl_weight, aligned)
    if note:
        logger.info("token-level KL skipped: %s", note)
    loss_fn = distillation_loss(None if note else teacher, mapping, kl_weight=kl_weight, temperature=kl_temperature,
                                student_pad_id=tokenizer.pad_token_id,
                                teacher_pad_id=(teacher_tokenizer or tokenizer).pad_token_id)
    positions = sum(len(e.get("kl_pairs", ())) for e in examples)
    targets = sum(label != -100 for e in examples for label in e["labels"])
    logger.debug("distilling into %s on %s: %d prompts, KL on %d of %d target positions (%d examples)",
                migrated_adapter_dir, new_model_dir, len(examples), 0 if note else positions, targets, aligned)
    result = finetune_examples(student, tokenizer, examples, out_dir, config=config, loss_fn=loss_fn)
    return DistillTraining(mode=MODE_SEQUENCE if note else MODE_KL, n_prompts=len(examples),
                           kl_examples=0 if note else aligned, kl_positions=0 if note else positions,
                           target_positions=targets, kl_note=note, training=result)


def _kl_note(teacher, token_map: TokenMap | None, kl_weight: float, aligned: int) -> str:
    """Why the KL term is off ('' when it is on)."""
    if kl_weight == 0:
        return "kl_weight is 0"
    if token_map is None:
        return "the vocabularies differ and no shared-token map was given"
    if teacher is None:
        return "no teacher model given to the training loop"
    if aligned == 0:
        return "no position of the teacher's completions aligns with the student's tokenization"
    return ""


# --------------------------------------------------------------------------- end to end

@dataclass(kw_only=True)
class DistillConfig:
    """Knobs of :func:`distill` (``train``: the LFT loop's own config, :func:`default_lft_config`)."""

    train: TrainConfig
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    max_new_tokens: int = 128
    generation_batch_size: int = 16


@dataclass
class DistillReport:
    """What the report records; ``heldout_*`` completions are kept for the quality gate, not serialised."""

    mode: str
    prompt_source: str
    n_prompts: int
    n_heldout: int
    kl_examples: int
    kl_positions: int
    target_positions: int
    kl_note: str
    teacher_agreement_before: float
    teacher_agreement_after: float
    seconds: float
    training: dict[str, Any]
    heldout_teacher: list[Completion] = field(default_factory=list, repr=False)
    heldout_student: list[Completion] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("heldout_teacher")
        data.pop("heldout_student")
        data["training"] = {k: v for k, v in self.training.items() if k != "losses"}
        return data


def distill(old_model_dir: str | Path, source_adapter_dir: str | Path, new_model_dir: str | Path,
            migrated_adapter_dir: str | Path, out_dir: str | Path, prompts: Sequence[Prompt], *,
            heldout: Sequence[Prompt], config: DistillConfig,
            shared_ids: tuple[Sequence[int], Sequence[int]] | None = None,
            prompt_source: str = "file") -> DistillReport:
    """Teacher completions, student agreement before, distillation into ``out_dir``, agreement after.

    ``shared_ids``: (old ids, new ids) of the shared vocabulary, for the KL term when the vocabularies differ.
    """
    if not prompts or not heldout:
        raise ValueError(f"distillation needs prompts and held-out prompts, got {len(prompts)} and {len(heldout)}")
    start = time.perf_counter()
    device, dtype = config.train.device, config.train.dtype
    gen = {"max_new_tokens": config.max_new_tokens, "batch_size": config.generation_batch_size}
    teacher, teacher_tok = load_for_generation(old_model_dir, source_adapter_dir, dtype=dtype, device=device)
    targets = greedy_completions(teacher, teacher_tok, prompts, **gen)
    heldout_teacher = greedy_completions(teacher, teacher_tok, heldout, **gen)
    before = _student_completions(new_model_dir, migrated_adapter_dir, heldout, dtype, device, gen)
    token_map = TokenMap.between(teacher_tok, load_tokenizer(new_model_dir), shared_ids)
    trained = distill_finetune(new_model_dir, migrated_adapter_dir, prompts, targets, out_dir, config=config.train,
                               teacher=teacher, teacher_tokenizer=teacher_tok, token_map=token_map,
                               kl_weight=config.kl_weight, kl_temperature=config.kl_temperature)
    del teacher
    after = _student_completions(new_model_dir, out_dir, heldout, dtype, device, gen)
    return DistillReport(mode=trained.mode, prompt_source=prompt_source, n_prompts=trained.n_prompts,
                         n_heldout=len(heldout), kl_examples=trained.kl_examples,
                         kl_positions=trained.kl_positions, target_positions=trained.target_positions,
                         kl_note=trained.kl_note,
                         teacher_agreement_before=teacher_agreement(before, heldout_teacher),
                         teacher_agreement_after=teacher_agreement(after, heldout_teacher),
                         seconds=round(time.perf_counter() - start, 4), training=trained.to_dict()["training"],
                         heldout_teacher=heldout_teacher, heldout_student=after)


def _student_completions(model_dir, adapter_dir, prompts, dtype: str, device: str, gen: dict) -> list[Completion]:
    model, tokenizer = load_for_generation(model_dir, adapter_dir, dtype=dtype, device=device)
    return greedy_completions(model, tokenizer, prompts, **gen)
