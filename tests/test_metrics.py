import torch

from fisherkd.metrics import FidelityMeter, expected_calibration_error


def naive_ece(logits: torch.Tensor, target: torch.Tensor, bins: int = 15) -> float:
    probs = torch.softmax(logits.double(), -1)
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [n for n in range(len(target)) if low < probs[n].max().item() <= high]
        if not members:
            continue
        confidence = sum(probs[n].max().item() for n in members) / len(members)
        accuracy = sum(int(probs[n].argmax().item() == target[n].item()) for n in members) / len(members)
        total += len(members) / len(target) * abs(confidence - accuracy)
    return total


def test_ece_matches_a_naive_loop():
    torch.manual_seed(0)
    for scale in (0.5, 3.0):
        logits, target = torch.randn(200, 7) * scale, torch.randint(0, 7, (200,))
        assert abs(expected_calibration_error(logits, target).item() - naive_ece(logits, target)) < 1e-5


def test_fidelity_on_a_hand_made_case():
    teacher = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    student = torch.tensor([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    target = torch.tensor([0, 1, 1, 1])  # the teacher is wrong on sample 2 only
    meter = FidelityMeter()
    meter.update(student[:2], target[:2], teacher[:2])
    meter.update(student[2:], target[2:], teacher[2:])
    values = meter.compute()
    assert values["accuracy"] == 0.5 and values["teacher_accuracy"] == 0.75 and values["agreement"] == 0.75
    assert abs(values["agreement_teacher_right"] - 2 / 3) < 1e-6 and values["agreement_teacher_wrong"] == 1.0
    log_t, log_s = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    kl = sum((log_t[n].exp() * (log_t[n] - log_s[n])).sum().item() for n in range(4)) / 4
    assert abs(values["kl"] - kl) < 1e-6


def test_rows_with_non_finite_logits_are_never_right():
    # argmax of a NaN row is index 0 on CPU: with label 0 it used to count as correct (a NaN model scored 100%)
    nan, inf = float("nan"), float("inf")
    student = torch.tensor([[nan, nan], [nan, 0.0], [1.0, inf], [3.0, 0.0]])
    teacher = torch.tensor([[nan, nan], [5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    target = torch.tensor([0, 0, 1, 0])
    meter = FidelityMeter()
    meter.update(student, target, teacher)
    values = meter.compute()
    # only the last row is finite in both models: the student is right there and agrees with the teacher
    assert values["accuracy"] == 0.25
    assert values["agreement"] == 0.25
    assert values["teacher_accuracy"] == 0.75  # the teacher's NaN row is wrong, its other three are right
    assert abs(values["agreement_teacher_right"] - 1 / 3) < 1e-6


def test_rouge_l_by_hand():
    from fisherkd.metrics import rouge_l

    # LCS of "a b c d e" and "a x c e" is "a c e" (3): P = 3/5, R = 3/4, F = 2·0.6·0.75/1.35 = 2/3
    assert abs(rouge_l("abcde", "axce") - 2 / 3) < 1e-12
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1, 2], [3, 4]) == 0.0 and rouge_l([], [1]) == 0.0
    # order matters: the reverse shares a single-token subsequence only
    assert abs(rouge_l([1, 2, 3], [3, 2, 1]) - 1 / 3) < 1e-12
