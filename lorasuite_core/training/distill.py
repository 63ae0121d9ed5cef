"""Teacher-distilled light fine-tuning: LFT without labelled data (Trans-LoRA style).

Roles
-----
* **Teacher** ``T``: the old base model + the old (source) adapter -- the behaviour to keep.
* **Student** ``S``: the new base model + the migrated adapter; only its LoRA A/B matrices train.

Data flow
---------
1. Prompts ``x_1 .. x_n`` without answers (:mod:`lorasuite_core.training.prompts`): read from a
   file or URI, or written by the teacher's base model in the style of a few seeds.
2. Targets: the teacher's greedy completion ``y_i = argmax-decode T(. | P(x_i))`` with the built-in
   prompt template ``P`` (:func:`~lorasuite_core.training.task_data.format_prompt`, the template the
   adapters were trained with), cut as evaluation scores it.  A prompt of a registered skill
   (``Prompt.task``, from ``task:NAME:...`` data) is generated with that skill's stop rule and token
   budget and cut by :meth:`~lorasuite_core.training.skills.base.Skill.target_text` (e.g. after the
   answer sentence, or after the first function call); a prompt without a task (``builtin:``, a file)
   as before: up to 128 new tokens, stopped and cut at the first stop marker and right after the first
   complete "The answer is N" sentence (its period kept).  :func:`greedy_completions`
   keeps the teacher's *token ids* for exactly that text, not only the text: decoding then
   re-encoding is lossy (byte tokens of partial UTF-8 characters decode to U+FFFD); the generation lives in
   :mod:`~lorasuite_core.training.completions`.
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
5. Agreement: :func:`answers_agree` scores a prompt of a registered skill with that skill's scorer,
   the teacher's answer as the reference (:meth:`~lorasuite_core.training.skills.base.Skill.agrees`);
   a prompt without a task compares final answers (:mod:`~lorasuite_core.training.agreement`) -- the last number
   of the scored text, compared numerically (:func:`~lorasuite_core.training.evaluation.answers_match`),
   or, where either side holds no number, the whitespace-normalised scored text itself.
   :func:`teacher_agreement` is the fraction of prompts whose final answers agree.
   :func:`distill` reports it on held-out prompts before and after training, the student generating in
   ``DistillConfig.generation_dtype`` (the pipeline's ``generation_dtype``: bf16 where the hardware has it; greedy
   answers are not an exact path).
6. Early stopping (``DistillConfig.patience``): :mod:`~lorasuite_core.training.early_stopping`.
7. On-policy batches (``DistillConfig.on_policy``, GKD): a share of the micro-batches trains on the student's own
   samples, the KL term alone: :mod:`~lorasuite_core.training.on_policy`.

Models and adapters are read from safetensors only; ``trust_remote_code`` is False.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from lorasuite_core.models.tokens import token_surfaces
from lorasuite_core.training.agreement import (_skill, accuracy, answers_agree, final_answers_agree,  # noqa: F401 (API)
                                               scored_text, teacher_agreement)
from lorasuite_core.training.completions import (DEFAULT_MAX_NEW_TOKENS, Completion,  # noqa: F401 (API)
                                                 greedy_completions, teacher_completions)
from lorasuite_core.training.evaluation import load_for_generation, model_eos_ids  # noqa: F401 (API)
from lorasuite_core.training.prompts import Prompt
from lorasuite_core.training.config import TrainConfig
from lorasuite_core.training.early_stopping import EarlyStopping, for_distillation
from lorasuite_core.training.train import (TrainResult, collate, finetune_examples, labelled_logits,
                                           load_for_light_finetune, load_tokenizer)

logger = logging.getLogger(__name__)

MODE_SEQUENCE = "sequence"
MODE_KL = "sequence+token_kl"


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
        example: dict[str, Any] = {"input_ids": (prompt_ids + output_ids)[:max_length], "labels": labels,
                                   "prompt": prompt}
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
                      student_pad_id: int, teacher_pad_id: int, ce_weight: float = 1.0):
    """``loss_fn(model, chunk)``: ``ce_weight`` x CE over the targets + ``kl_weight`` x restricted KL on the aligned
    examples (``ce_weight`` 0: the KL alone, as on-policy batches train: :mod:`~lorasuite_core.training.on_policy`)."""

    def loss_fn(model, chunk: list[dict[str, Any]]) -> torch.Tensor:
        device = next(p for p in model.parameters()).device
        batch = {k: v.to(device) for k, v in collate(chunk, student_pad_id).items()}
        logits, targets = labelled_logits(model, batch)
        loss = ce_weight * torch.nn.functional.cross_entropy(logits.float(), targets)
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
    early_stopping: EarlyStopping | None = None
    on_policy: Any = None     # on_policy.OnPolicyCounts, with ``on_policy`` > 0

    def to_dict(self) -> dict[str, Any]:
        training = self.training.to_dict()
        training.pop("out_dir", None)
        return {"mode": self.mode, "n_prompts": self.n_prompts, "kl_examples": self.kl_examples,
                "kl_positions": self.kl_positions, "target_positions": self.target_positions,
                "kl_note": self.kl_note, "training": training,
                **({"early_stopping": self.early_stopping.to_dict()} if self.early_stopping else {}),
                **({"on_policy": self.on_policy.to_dict()} if self.on_policy else {})}


def distill_finetune(new_model_dir: str | Path, migrated_adapter_dir: str | Path, prompts: Sequence[Prompt],
                     teacher_completions: Sequence[Completion], out_dir: str | Path, *,
                     config: TrainConfig, teacher=None, teacher_tokenizer=None,
                     token_map: TokenMap | None = None, kl_weight: float = 1.0,
                     kl_temperature: float = 1.0, patience: int | None = None, heldout: Sequence[Prompt] = (),
                     heldout_teacher: Sequence[Completion] = (), gen: dict[str, Any] | None = None,
                     on_policy: float = 0.0) -> DistillTraining:
    """Train the migrated adapter on ``(prompt, teacher completion)`` pairs, + token KL where ``token_map`` allows.

    ``teacher``/``teacher_tokenizer``: the loaded teacher (needed for the KL term; the tokenizer also
    for aligning). Without them, or without ``token_map``, or with ``kl_weight == 0``: sequence-level only.
    ``patience``: early stopping on the agreement with ``heldout_teacher`` on ``heldout`` (``gen``: the
    generation's budget and batch, :func:`greedy_completions`); None: every epoch, the last one published.
    ``on_policy``: the share of micro-batches trained on the student's own samples (:mod:`.on_policy`; needs the KL
    term's teacher and map: without them every batch trains off-policy, and the counts say why in ``skipped``).
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
    selector = None if patience is None else for_distillation(
        patience=patience, max_epochs=config.epochs, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer or tokenizer,
        prompts=heldout, teacher_completions=heldout_teacher, max_length=config.max_length, token_map=mapping,
        loss_fn=loss_fn, batch_size=config.batch_size, gen=gen or {})
    counts, train_loss = None, loss_fn
    if on_policy > 0 and note:
        # the pair decides this at run time (e.g. too few shared tokens for a token map): distil off-policy
        from lorasuite_core.training.on_policy import OnPolicyCounts

        logger.warning("on-policy distillation skipped, every batch trains on the teacher's answers: it needs the "
                       "token-level KL term, which is off: %s", note)
        counts = OnPolicyCounts(share=on_policy, skipped=f"the token-level KL term is off: {note}")
    elif on_policy > 0:
        from lorasuite_core.training.on_policy import on_policy_loss

        train_loss, counts = on_policy_loss(loss_fn, share=on_policy, seed=config.seed, teacher=teacher,
                                            tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer, token_map=mapping,
                                            kl_temperature=kl_temperature, max_length=config.max_length,
                                            batch_size=(gen or {}).get("batch_size") or 16)
    result = finetune_examples(student, tokenizer, examples, out_dir, config=config, loss_fn=train_loss,
                               selector=selector, frozen=() if teacher is None or note else (teacher,))
    return DistillTraining(mode=MODE_SEQUENCE if note else MODE_KL, n_prompts=len(examples),
                           kl_examples=0 if note else aligned, kl_positions=0 if note else positions,
                           target_positions=targets, kl_note=note, training=result, early_stopping=selector,
                           on_policy=counts)


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
    max_new_tokens: int | None = None   # None: each prompt's skill budget (DEFAULT_MAX_NEW_TOKENS without a task)
    generation_batch_size: int = 16
    patience: int | None = None         # early stopping on held-out agreement (None: off)
    on_policy: float = 0.0              # share of micro-batches on the student's own samples (GKD; 0: off)
    generation_dtype: str | None = None  # the teacher's answers (where not given) and the student's held-out answers
                                         # before and after (None: ``train.dtype``)


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
    early_stopping: dict[str, Any] | None = None     # per-epoch held-out scores (with ``patience``)
    on_policy: dict[str, Any] | None = None          # on-policy share and batches (with ``on_policy``)
    heldout_teacher: list[Completion] = field(default_factory=list, repr=False)
    heldout_student: list[Completion] = field(default_factory=list, repr=False)
    targets: list[Completion] = field(default_factory=list, repr=False)     # the teacher's, on the training prompts

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for kept in ("heldout_teacher", "heldout_student", "targets"):
            data.pop(kept)
        data["training"] = {k: v for k, v in self.training.items() if k != "losses"}
        return {k: v for k, v in data.items() if k not in ("early_stopping", "on_policy") or v is not None}


def distill(old_model_dir: str | Path, source_adapter_dir: str | Path, new_model_dir: str | Path,
            migrated_adapter_dir: str | Path, out_dir: str | Path, prompts: Sequence[Prompt], *,
            heldout: Sequence[Prompt], config: DistillConfig,
            shared_ids: tuple[Sequence[int], Sequence[int]] | None = None,
            prompt_source: str = "file", targets: Sequence[Completion] | None = None,
            heldout_teacher: Sequence[Completion] | None = None) -> DistillReport:
    """Teacher completions, student agreement before, distillation into ``out_dir``, agreement after.

    ``shared_ids``: (old ids, new ids) of the shared vocabulary, for the KL term when the vocabularies differ.
    ``targets`` / ``heldout_teacher``: the teacher's completions on ``prompts`` / ``heldout``, already generated.
    """
    for given, asked in ((targets, prompts), (heldout_teacher, heldout)):
        if given is not None and len(given) != len(asked):
            raise ValueError(f"{len(given)} teacher completions given for {len(asked)} prompts")
    if not prompts or not heldout:
        raise ValueError(f"distillation needs prompts and held-out prompts, got {len(prompts)} and {len(heldout)}")
    start = time.perf_counter()
    device, dtype = config.train.device, config.train.dtype
    gen = {"max_new_tokens": config.max_new_tokens, "batch_size": config.generation_batch_size}
    gen_dtype = config.generation_dtype or dtype
    teacher, teacher_tok = load_for_generation(old_model_dir, source_adapter_dir, dtype=dtype, device=device)
    if targets is None or heldout_teacher is None:      # the teacher answers here, in the generation dtype
        speaker = teacher if gen_dtype == dtype else load_for_generation(old_model_dir, source_adapter_dir,
                                                                          dtype=gen_dtype, device=device)[0]
        targets = targets if targets is not None else greedy_completions(speaker, teacher_tok, prompts, **gen)
        heldout_teacher = (heldout_teacher if heldout_teacher is not None
                           else greedy_completions(speaker, teacher_tok, heldout, **gen))
        del speaker
    targets, heldout_teacher = list(targets), list(heldout_teacher)
    before = _student_completions(new_model_dir, migrated_adapter_dir, heldout, gen_dtype, device, gen)
    token_map = TokenMap.between(teacher_tok, load_tokenizer(new_model_dir), shared_ids)
    trained = distill_finetune(new_model_dir, migrated_adapter_dir, prompts, targets, out_dir, config=config.train,
                               teacher=teacher, teacher_tokenizer=teacher_tok, token_map=token_map,
                               kl_weight=config.kl_weight, kl_temperature=config.kl_temperature,
                               patience=config.patience, heldout=heldout, heldout_teacher=heldout_teacher, gen=gen,
                               on_policy=config.on_policy)
    del teacher
    after = _student_completions(new_model_dir, out_dir, heldout, gen_dtype, device, gen)
    tasks = [p.task for p in heldout]
    return DistillReport(mode=trained.mode, prompt_source=prompt_source, n_prompts=trained.n_prompts,
                         n_heldout=len(heldout), kl_examples=trained.kl_examples,
                         kl_positions=trained.kl_positions, target_positions=trained.target_positions,
                         kl_note=trained.kl_note,
                         teacher_agreement_before=teacher_agreement(before, heldout_teacher, tasks),
                         teacher_agreement_after=teacher_agreement(after, heldout_teacher, tasks),
                         seconds=round(time.perf_counter() - start, 4), training=trained.to_dict()["training"],
                         early_stopping=trained.to_dict().get("early_stopping"),
                         on_policy=trained.to_dict().get("on_policy"),
                         heldout_teacher=heldout_teacher, heldout_student=after, targets=targets)


def _student_completions(model_dir, adapter_dir, prompts, dtype: str, device: str, gen: dict) -> list[Completion]:
    model, tokenizer = load_for_generation(model_dir, adapter_dir, dtype=dtype, device=device)
    return greedy_completions(model, tokenizer, prompts, **gen)
