"""Accuracy and fidelity diagnostics, accumulated on the device and read once."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def predictions_right(logits: Tensor, reference: Tensor) -> Tensor:
    """Whether each row's top-1 class is ``reference`` (labels, B). A row with any non-finite logit is wrong: the
    argmax of a NaN row is an arbitrary index (0 on CPU), which would otherwise count as a prediction."""
    return (logits.argmax(-1) == reference) & logits.isfinite().all(-1)


def expected_calibration_error(logits: Tensor, target: Tensor, bins: int = 15) -> Tensor:
    """ECE with equal-width confidence bins, each bin weighted by its share of samples (Guo et al. 2017)."""
    probs = F.softmax(logits.float(), dim=-1)
    confidence = probs.max(-1).values
    correct = predictions_right(logits, target).float()
    # bin b holds confidences in (b/bins, (b+1)/bins]; confidence is always > 0
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    conf_sum = torch.zeros(bins, device=logits.device).index_add_(0, which, confidence)
    acc_sum = torch.zeros(bins, device=logits.device).index_add_(0, which, correct)
    return (conf_sum - acc_sum).abs().sum() / len(target)


class FidelityMeter:
    """Sums, over an evaluation pass, what the epoch report needs: student and teacher accuracy, top-1 agreement
    with the teacher, KL(p_t ‖ p_s) at τ=1 and the logits for ECE. Nothing leaves the device until ``compute``."""

    def __init__(self) -> None:
        self.student_logits: list[Tensor] = []
        self.teacher_logits: list[Tensor] = []
        self.targets: list[Tensor] = []

    def update(self, student_logits: Tensor, target: Tensor, teacher_logits: Tensor | None = None) -> None:
        self.student_logits.append(student_logits.detach().float())
        self.targets.append(target)
        if teacher_logits is not None:
            self.teacher_logits.append(teacher_logits.detach().float())

    def compute(self) -> dict[str, float]:
        student = torch.cat(self.student_logits)
        target = torch.cat(self.targets)
        values = {
            "accuracy": predictions_right(student, target).float().mean(),
            "ece": expected_calibration_error(student, target),
        }
        if self.teacher_logits:
            teacher = torch.cat(self.teacher_logits)
            log_p_s, log_p_t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
            # rows where either model has a non-finite logit agree with nothing
            agree = predictions_right(student, teacher.argmax(-1)) & teacher.isfinite().all(-1)
            teacher_right = predictions_right(teacher, target)
            values |= {
                "teacher_accuracy": teacher_right.float().mean(),
                "agreement": agree.float().mean(),
                "kl": (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean(),
                # error inheritance: does the student follow the teacher where the teacher is wrong?
                "agreement_teacher_right": agree[teacher_right].float().mean(),
                "agreement_teacher_wrong": agree[~teacher_right].float().mean(),
            }
        stacked = torch.stack(list(values.values())).tolist()  # one host transfer
        return {k: v for k, v in zip(values, stacked) if v == v}  # drop NaN (e.g. a teacher that is never wrong)


def rouge_l(candidate: Sequence[Hashable], reference: Sequence[Hashable]) -> float:
    """ROUGE-L F1 (Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", 2004) of two token sequences:
    with L the length of their longest common subsequence, P = L/|candidate|, R = L/|reference|, F = 2PR/(P + R);
    0 when either is empty or they share nothing."""
    if not candidate or not reference:
        return 0.0
    previous = [0] * (len(reference) + 1)
    for token in candidate:  # dynamic programme over the LCS table, one row at a time
        current = [0]
        for j, other in enumerate(reference):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)
