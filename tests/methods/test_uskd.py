import math

import pytest
import torch
from naive_logits import labels, mean, random_case, rows, softmax

from fisherkd import functional as Fn
from fisherkd.distiller import Distiller
from fisherkd.methods import create
from helpers import TinyCNN, tiny_image_batch


def naive_uskd(z, y, weak, alpha, beta, mu) -> float:
    """USKD straight from the authors' description, one sample at a time in plain floats."""
    zs, ys = rows(z), labels(y)
    ws = rows(weak) if weak is not None else None
    squared = [softmax(row)[c] ** 2 for row, c in zip(zs, ys)]
    batch_mean = mean(squared)
    losses = []
    for n, (row, c) in enumerate(zip(zs, ys)):
        p = softmax(row)
        classes = len(row)
        soft_target = squared[n] + 1.0 - batch_mean
        target = -soft_target * math.log(p[c])
        score = [math.log(p[i]) / (1.0 - math.log(p[c])) for i in range(classes)]
        weak_term = 0.0
        if ws is not None:
            w = softmax(ws[n])
            score = [score[i] + w[i] / (1.0 - w[c] + 1e-6) for i in range(classes)]
            smoothed = [0.9 * (i == c) + 0.1 / classes for i in range(classes)]
            weak_term = -sum(smoothed[i] * math.log(w[i]) for i in range(classes))
        by_score = sorted(range(classes), key=lambda i: -score[i])
        zipf = {i: 1.0 / (k + 1) for k, i in enumerate(by_score)}
        others = [i for i in range(classes) if i != c]
        total = sum(zipf[i] for i in others)
        p_hat = softmax([row[i] for i in others])
        non_target = -sum(zipf[i] / total * math.log(q) for i, q in zip(others, p_hat))
        losses.append(alpha * target + beta * non_target + (mu * weak_term if ws is not None else 0.0))
    return mean(losses)


@pytest.mark.parametrize("shape", [(4, 3), (7, 10), (3, 50)])
@pytest.mark.parametrize(("alpha", "beta", "mu"), [(0.1, 0.1, 0.1), (1.0, 0.1, 0.005), (0.3, 2.0, 0.0)])
@pytest.mark.parametrize("with_weak", [False, True])
def test_uskd_matches_naive_loop(shape, alpha, beta, mu, with_weak):
    z, weak, y = random_case(shape, seed=shape[0] * shape[1])
    weak = weak if with_weak else None
    expected = naive_uskd(z, y, weak, alpha, beta, mu)
    assert math.isclose(Fn.uskd(z, y, weak, alpha, beta, mu).item(), expected, rel_tol=1e-9)


def test_zipf_labels_by_hand():
    # classes ranked 0 > 1 > 2 > 3 with target 0: the non-target labels are (1/2, 1/3, 1/4) / (13/12)
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    q = torch.tensor([6 / 13, 4 / 13, 3 / 13], dtype=torch.float64)
    log_p_hat = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64), -1)
    value = Fn.uskd(z, y, alpha=0.0, beta=1.0)
    assert math.isclose(value.item(), -(q * log_p_hat).sum().item(), rel_tol=1e-12)
    # a weak head that ranks class 3 first reorders the labels: 3 gets 1/2 (rank 2 after the target), 1 and 2 follow
    weak = torch.tensor([[0.0, 0.0, 0.0, 10.0]], dtype=torch.float64)
    reordered = Fn.uskd(z, y, weak, alpha=0.0, beta=1.0, mu=0.0)
    assert not math.isclose(reordered.item(), value.item(), rel_tol=1e-6)


def test_soft_labels_are_constants():
    # with constant labels the gradient of a soft cross-entropy is (prediction − label) on each softmax's logits
    z, weak, y = random_case((5, 6), seed=3)
    z.requires_grad_(True)
    Fn.uskd(z, y, alpha=1.0, beta=0.0).backward()
    p = torch.softmax(z.detach(), -1)
    p_y = p.gather(1, y[:, None])
    soft_target = p_y**2 + 1 - (p_y**2).mean()
    expected = soft_target * (p - torch.nn.functional.one_hot(y, 6)) / 5
    torch.testing.assert_close(z.grad, expected)

    z.grad = None
    Fn.uskd(z, y, weak, alpha=0.0, beta=1.0, mu=0.0).backward()
    assert torch.all(z.grad.gather(1, y[:, None]) == 0)  # the target logit is not in the non-target softmax
    assert torch.allclose(z.grad.sum(1), torch.zeros(5, dtype=z.dtype), atol=1e-12)  # a softmax's gradient sums to 0


def test_uskd_trains_without_a_teacher():
    x, y = tiny_image_batch()
    torch.manual_seed(0)
    student = TinyCNN(width=4)
    method = create("uskd")
    assert (method.hparams.alpha, method.hparams.beta, method.hparams.mu) == (0.1, 0.1, 0.1)
    assert not method.needs_teacher and method.needs_target
    distiller = Distiller(student, None, ["ce", {"name": "uskd", "pairs": [["block1", ""]]}], example_input=x[:2])
    head = distiller.methods[1].weak_head
    assert (head.in_features, head.out_features) == (4, 5)  # block1's channels, the student's classes
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-2)
    assert any(p is head.weight for p in distiller.trainable_parameters())
    losses = []
    for _ in range(30):
        out = distiller(x, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.losses["uskd"].item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    distiller.close()


def test_uskd_without_a_pair_ranks_by_the_final_logits():
    x, y = tiny_image_batch()
    distiller = Distiller(TinyCNN(width=4), None, ["uskd"])
    out = distiller(x, y)
    assert distiller.methods[0].weak_head is None
    expected = Fn.uskd(out.logits, y, None, 0.1, 0.1, 0.1)
    torch.testing.assert_close(out.losses["uskd"], expected)


def test_uskd_trains_through_the_engine_without_a_teacher():
    from fisherkd.config import TrainConfig
    from fisherkd.data import ArrayDataset, DataSplits
    from fisherkd.engine.trainer import Trainer

    x, y = tiny_image_batch()
    splits = DataSplits("tiny", ArrayDataset(x, y), ArrayDataset(x[:8], y[:8]), 5, (3, 8, 8))
    distiller = Distiller(TinyCNN(width=4), None, ["ce", {"name": "uskd", "pairs": [["pool", ""]]}], x[:2])
    config = TrainConfig(epochs=2, batch_size=8, optimizer={"name": "adamw", "lr": 1e-3})
    summary = Trainer(distiller, splits, config, device="cpu").fit()
    assert summary["steps"] == 4
    distiller.close()


def test_compare_pairs_uskd_with_the_label_loss():
    from fisherkd.compare import CompareOptions, method_recipe

    assert method_recipe("uskd", CompareOptions(), 100) == [{"name": "ce", "weight": 1.0}, {"name": "uskd"}]
    assert method_recipe("ce", CompareOptions(), 100) == [{"name": "ce"}]
