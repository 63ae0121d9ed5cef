"""On-policy distillation (GKD, Agarwal et al. 2024): the student also learns on answers it writes itself.

Why
---
Sequence-level distillation (:mod:`lorasuite_core.training.distill`) trains the student on the teacher's answers
only.  When the student generates, it reads its own earlier tokens, and once those differ from the teacher's it is
in prefixes it never trained on (exposure bias).  GKD trains on what the student writes and asks the teacher what it
would write at every one of those prefixes.

Math
----
For a training prompt ``x`` the current student (new model + the adapter being trained, in eval mode, no gradient)
samples ``y ~ p_S(. | P(x))`` at temperature :data:`SAMPLE_TEMPERATURE`, with the prompt's stop rule, budget and cut
(:func:`~lorasuite_core.training.consistency.sampled_completions`).  ``y`` is then scored as a teacher answer would
be: the teacher side reads ``y`` in its own tokenization (the same ids under identical vocabularies), and at every
aligned position pair ``(i, j)`` (:func:`~lorasuite_core.training.distill.aligned_positions`; all of them, and the
EOS position, under identical vocabularies) with teacher logits ``a_i`` and student logits ``b_j`` restricted to
the shared vocabulary ``S`` and KL temperature ``tau``::

    L_on(x) = tau^2 * mean_(i,j) KL( softmax(a_i[t_S] / tau) || softmax(b_j[s_S] / tau) )

There is no cross-entropy term: ``y`` is the student's own text, right or wrong; the teacher's distribution at each
of its prefixes is the target, including whether to stop there (the EOS position).

Mixing (GKD's lambda)
---------------------
Each micro-batch is on-policy with probability ``share`` (``lft_on_policy``), decided by a ``random.Random`` seeded
with the run's seed; the others train as before (cross-entropy on the teacher's answers + the KL term).  Each
on-policy micro-batch draws its samples with its own seed (the run's seed and the batch's count), so a rerun gives
the same samples.  Sampling follows the adapter as it trains.  It needs what the KL term needs -- a token map and
the loaded teacher -- and is refused without them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

#: Temperature of the student's samples (GKD samples from the student's distribution as it is).
SAMPLE_TEMPERATURE = 1.0
#: Version of these rules in the LFT stage's key.
ON_POLICY_VERSION = 1


@dataclass
class OnPolicyCounts:
    """What the report records: the share asked for, and the micro-batches trained each way."""

    share: float
    on_policy_batches: int = 0
    off_policy_batches: int = 0
    sampled_tokens: int = 0
    kl_positions: int = 0
    skipped: str = ""         # why no batch trained on-policy, where it was asked for and could not run

    def to_dict(self) -> dict[str, Any]:
        return {"share": self.share, "on_policy_batches": self.on_policy_batches,
                "off_policy_batches": self.off_policy_batches, "sampled_tokens": self.sampled_tokens,
                "kl_positions": self.kl_positions, "sample_temperature": SAMPLE_TEMPERATURE,
                **({"skipped": self.skipped} if self.skipped else {})}


def on_policy_loss(off_policy: Callable, *, share: float, seed: int, teacher, tokenizer, teacher_tokenizer,
                   token_map, kl_temperature: float, max_length: int, batch_size: int) -> tuple[Callable, OnPolicyCounts]:
    """``loss_fn(model, chunk)`` that trains a ``share`` of the micro-batches on the student's own samples.

    ``off_policy``: the loss of the other micro-batches (distillation's).  The chunk's examples carry their
    ``"prompt"`` (:func:`~lorasuite_core.training.distill.distillation_examples`)."""
    from lorasuite_core.training import distill as D
    from lorasuite_core.training.consistency import sampled_completions

    if not 0 < share <= 1:
        raise ValueError(f"on-policy share must be in (0, 1], got {share}")
    if teacher is None or token_map is None:
        raise ValueError("on-policy distillation needs the loaded teacher and a token map (as the KL term does)")
    decide, counts = random.Random(seed), OnPolicyCounts(share=share)
    kl_only = D.distillation_loss(teacher, token_map, kl_weight=1.0, temperature=kl_temperature,
                                  student_pad_id=tokenizer.pad_token_id, teacher_pad_id=teacher_tokenizer.pad_token_id,
                                  ce_weight=0.0)

    def loss_fn(model, chunk: list[dict[str, Any]]) -> torch.Tensor:
        if decide.random() >= share:
            counts.off_policy_batches += 1
            return off_policy(model, chunk)
        prompts = [example["prompt"] for example in chunk]
        was_training = model.training
        model.eval()
        try:
            samples = [s[0] for s in sampled_completions(model, tokenizer, prompts, 1, temperature=SAMPLE_TEMPERATURE,
                                                         seed=seed * 100_003 + counts.on_policy_batches,
                                                         batch_size=batch_size)]
        finally:
            model.train(was_training)
        teacher_side = [sample if token_map.identity else
                        D.Completion(text=sample.text,
                                     ids=tuple(teacher_tokenizer(sample.text, add_special_tokens=False)["input_ids"]))
                        for sample in samples]
        examples = [e for e in D.distillation_examples(tokenizer, teacher_tokenizer, prompts, teacher_side, max_length,
                                                       token_map) if "teacher" in e]
        if not examples:                 # nothing of the samples aligns: train this batch as the others
            counts.off_policy_batches += 1
            return off_policy(model, chunk)
        counts.on_policy_batches += 1
        counts.sampled_tokens += sum(len(s.ids) for s in samples)
        counts.kl_positions += sum(len(e["kl_pairs"]) for e in examples)
        return kl_only(model, examples)

    return loss_fn, counts
