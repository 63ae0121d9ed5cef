"""Early stopping of distilled LFT on held-out teacher agreement (the options' ``lft_patience``).

With patience ``P`` distillation (:mod:`lorasuite_core.training.distill`) trains up to ``E`` epochs
(``lft_epochs``) and, after every epoch ``e``, scores the student ``S_e`` on the held-out prompts
``h_1 .. h_m`` -- the split distillation already reports agreement on, whose teacher completions
``t_k`` are already generated::

    agree_e = (1/m) sum_k [answers_agree(greedy(S_e, h_k), t_k)]       (distill.teacher_agreement)
    loss_e  = mean over the held-out micro-batches of the distillation loss on (h_k, t_k + EOS)
              (the training loss: CE, + KL where it is on; no gradient)

Epoch ``e`` *improves* on the best epoch ``b`` so far when ``(agree_e, -loss_e) > (agree_b, -loss_b)``
lexicographically: agreement first, the held-out loss breaks ties (the first epoch is the first best).
The trainable tensors (the LoRA A/B matrices, ``r x (d_in + d_out)`` per module) of the best epoch are
kept as a copy in memory; training stops once ``P`` consecutive epochs have not improved, and the
best epoch's tensors are written back into the model before it is saved.  The learning-rate
schedule still spans all ``E`` epochs (stopping does not shorten the decay), so an epoch's weights do
not depend on ``P``: with ``P >= E`` every epoch runs and the best of them is published.

Without patience nothing is scored between epochs and the last epoch is published (the behaviour
before this module).  The greedy decoding is evaluation's (:func:`distill.greedy_completions`), run
with the model in eval mode and no autocast, as the "after" agreement of the reloaded adapter is.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochScore:
    """One epoch's held-out scores (``epoch`` counts from 1)."""

    epoch: int
    agreement: float
    heldout_loss: float

    def beats(self, other: EpochScore | None) -> bool:
        """Higher agreement, or equal agreement and lower held-out loss."""
        return other is None or (self.agreement, -self.heldout_loss) > (other.agreement, -other.heldout_loss)


@dataclass
class EarlyStopping:
    """Per-epoch scoring, the best epoch's weights, and the stop rule (the module docstring).

    ``generate(model) -> completions`` greedily answers the held-out prompts; ``agreement(completions)``
    scores them against the teacher's; ``heldout_loss(model) -> float`` is the distillation loss on them.
    """

    patience: int
    max_epochs: int                     # E: the epochs planned (``lft_epochs``)
    generate: Callable[[Any], Sequence[Any]]
    agreement: Callable[[Sequence[Any]], float]
    heldout_loss: Callable[[Any], float]
    scores: list[EpochScore] = field(default_factory=list)
    best: EpochScore | None = None
    completions: Sequence[Any] = ()     # the best epoch's held-out completions
    _weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.patience < 1 or self.max_epochs < 1:
            raise ValueError(f"patience and max_epochs must be >= 1, got {self.patience}, {self.max_epochs}")

    def end_of_epoch(self, epoch: int, model) -> bool:
        """Score epoch ``epoch`` (from 0) of ``model``; keep its weights when it is the best; True: stop."""
        was_training = model.training
        model.eval()
        try:
            completions = list(self.generate(model))
            with torch.no_grad():
                loss = float(self.heldout_loss(model))
        finally:
            model.train(was_training)
        score = EpochScore(epoch=epoch + 1, agreement=self.agreement(completions), heldout_loss=loss)
        self.scores.append(score)
        if score.beats(self.best):
            self.best, self.completions = score, completions
            self._weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        logger.info("epoch %d: held-out agreement %.4f, loss %.4f (best: epoch %d)", score.epoch, score.agreement,
                    score.heldout_loss, self.best.epoch)  # type: ignore[union-attr]
        return score.epoch - self.best.epoch >= self.patience  # type: ignore[union-attr]

    def restore(self, model) -> None:
        """Write the best epoch's trainable tensors back into ``model`` (nothing when no epoch was scored)."""
        if not self._weights:
            return
        params = dict(model.named_parameters())
        missing = sorted(set(self._weights) - set(params))
        if missing:
            raise ValueError(f"early stopping: the model lacks the kept tensors {missing[:3]}")
        with torch.no_grad():
            for name, value in self._weights.items():
                params[name].copy_(value)

    def to_dict(self) -> dict[str, Any]:
        """What the report records: the patience, every epoch's scores, the published (best) epoch."""
        last = self.scores[-1].epoch if self.scores else 0
        return {"patience": self.patience, "max_epochs": self.max_epochs, "epochs_run": last,
                "best_epoch": self.best.epoch if self.best else None, "stopped_early": last < self.max_epochs,
                "epochs": [asdict(s) for s in self.scores]}


def for_distillation(*, patience: int, max_epochs: int, tokenizer, teacher_tokenizer, prompts: Sequence[Any],
                     teacher_completions: Sequence[Any], max_length: int, token_map, loss_fn, batch_size: int,
                     gen: dict[str, Any]) -> EarlyStopping:
    """:class:`EarlyStopping` on distillation's held-out ``prompts`` and the teacher's completions on them:
    greedy answers by :func:`~lorasuite_core.training.distill.greedy_completions` (``gen``: its budget and batch),
    agreement by :func:`~lorasuite_core.training.distill.teacher_agreement`, the held-out loss by ``loss_fn`` (the
    training loss) over micro-batches of ``batch_size`` examples built as the training examples are."""
    from lorasuite_core.training import distill as D

    examples = D.distillation_examples(tokenizer, teacher_tokenizer, prompts, teacher_completions, max_length,
                                       token_map)
    tasks = [p.task for p in prompts]

    def heldout_loss(model) -> float:
        losses = [loss_fn(model, examples[i:i + batch_size]).float() for i in range(0, len(examples), batch_size)]
        return float(torch.stack(losses).mean())

    return EarlyStopping(patience=patience, max_epochs=max_epochs,
                         generate=lambda model: D.greedy_completions(model, tokenizer, prompts, **gen),
                         agreement=lambda completions: D.teacher_agreement(completions, teacher_completions, tasks),
                         heldout_loss=heldout_loss)
