import math

import pytest
import torch
from naive_logits import kl, mean, rows, softmax

from fisherkd import functional as Fn
from fisherkd.distiller import Distiller
from fisherkd.methods import create
from fisherkd.methods.head import _random_rotations, lelp_directions
from helpers import TinyCNN, tiny_image_batch


def naive_lelp(u, z, h, directions, centers, tau, beta) -> float:
    """τ²·KL over the C·S pseudo-subclasses, one sample at a time in plain floats."""
    v, mu = directions.tolist(), centers.tolist()
    classes, subclasses = len(v), len(v[0])
    losses = []
    for u_n, z_n, h_n in zip(rows(u), rows(z), rows(h)):
        p_class = softmax(z_n, tau)
        target = []
        for c in range(classes):
            scores = [sum(v[c][j][d] * (h_n[d] - mu[c][d]) for d in range(len(h_n))) for j in range(subclasses)]
            target += [p_class[c] * q for q in softmax(scores, beta)]
        losses.append(tau * tau * kl(target, softmax(u_n, tau)))
    return mean(losses)


def random_lelp_case(batch: int, classes: int, subclasses: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, classes * subclasses, generator=g, dtype=torch.float64) * 2
    z = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 3
    h = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    directions = torch.randn(classes, subclasses, dim, generator=g, dtype=torch.float64)
    centers = torch.randn(classes, dim, generator=g, dtype=torch.float64) * 0.5
    return u, z, h, directions, centers


@pytest.mark.parametrize(("batch", "classes", "subclasses", "dim"), [(4, 2, 3, 5), (3, 3, 1, 4), (2, 5, 4, 6)])
@pytest.mark.parametrize(("tau", "beta"), [(1.0, 1.0), (4.0, 0.5), (2.0, 3.0)])
def test_lelp_matches_naive_loop(batch, classes, subclasses, dim, tau, beta):
    u, z, h, directions, centers = random_lelp_case(batch, classes, subclasses, dim, seed=batch + dim)
    value = Fn.lelp(u, z, h, directions, centers, tau, beta).item()
    assert math.isclose(value, naive_lelp(u, z, h, directions, centers, tau, beta), rel_tol=1e-9)


def test_without_directions_each_class_splits_evenly():
    # zero directions: P_t(c, j) = p_t(c)/S, so a student repeating the teacher's logit S times has loss 0
    u, z, h, directions, centers = random_lelp_case(5, 3, 4, 6, seed=1)
    student = z.repeat_interleave(4, dim=1)
    assert Fn.lelp(student, z, h, torch.zeros_like(directions), centers).abs().item() < 1e-12
    assert Fn.lelp(u, z, h, torch.zeros_like(directions), centers).item() > 0.1


def test_directions_are_the_null_space_pca_of_each_class():
    g = torch.Generator().manual_seed(0)
    classes, dim, subclasses = 2, 7, 3
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    projector = torch.eye(dim, dtype=torch.float64) - torch.linalg.pinv(weight) @ weight
    data = [torch.randn(40 + 10 * c, dim, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, dim) + c
            for c in range(classes)]
    count = torch.tensor([float(len(x)) for x in data], dtype=torch.float64)
    total = torch.stack([x.sum(0) for x in data])
    second = torch.stack([x.T @ x for x in data])
    rotations = _random_rotations(classes, subclasses, seed=3)
    directions, centers = lelp_directions(count, total, second, projector, rotations)
    for c, x in enumerate(data):
        torch.testing.assert_close(centers[c], x.mean(0))
        # independent statement: the top right singular vectors of the centred, projected data
        centred = (x - x.mean(0)) @ projector
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        top, variances = vh[:subclasses].T, s[:subclasses] ** 2 / len(x)
        # the rotation and signs do not change the span: VᵀV = U Uᵀ / mean(λ)
        torch.testing.assert_close(directions[c].T @ directions[c], top @ top.T / variances.mean())
        assert (weight @ directions[c].T).abs().max() < 1e-10  # in the null space of the classifier
        scores = (x - centers[c]) @ directions[c].T
        assert math.isclose(scores.var(0, unbiased=False).mean().item(), 1.0, rel_tol=1e-9)  # unit mean variance
    # a class never seen yet splits evenly (zero directions)
    count[1] = 0
    directions, _ = lelp_directions(count, total * 0, second * 0, projector, rotations)
    assert torch.all(directions[1] == 0)


def test_the_method_accumulates_in_training_and_predicts_through_the_subclass_head():
    x, y = tiny_image_batch()
    torch.manual_seed(0)
    student, teacher = TinyCNN(width=4), TinyCNN(width=8)
    distiller = Distiller(student, teacher, [{"name": "lelp", "pairs": [["pool", "pool"]]}], example_input=x[:2])
    distiller.clock.configure(steps_per_epoch=4)
    method = distiller.methods[0]
    assert method.subclass_head.out_features == 5 * 5 and method.subclass_head.in_features == 8
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        out = distiller(x, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        distiller.after_optimizer_step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[1]  # step 0's targets split evenly; from step 1 on they follow the directions
    with torch.no_grad():
        classes = teacher(x).argmax(1)
    assert method.count.tolist() == [20.0 * (classes == c).sum().item() for c in range(5)]
    distiller.eval()
    distiller(x, y)
    assert method.count.sum().item() == 20 * 16  # evaluation does not add statistics
    predictor = distiller.inference_model()
    with torch.no_grad():
        feature = student.pool(student.block2(student.block1(x)))
        expected = method.subclass_head(feature).view(16, 5, 5).logsumexp(-1)
        torch.testing.assert_close(predictor(x), expected)
    distiller.close()


def test_lelp_defaults_and_errors():
    method = create("lelp")
    h = method.hparams
    assert (h.subclasses, h.temperature, h.subclass_temperature, h.null_space) == (5, 1.0, 1.0, True)
    assert method.label_weight == 0.0 and method.default_weight == 1.0
    x, _ = tiny_image_batch()
    # the teacher's 16-dim pooled feature minus its 5 classifier rows leaves 11 directions
    with pytest.raises(ValueError, match="leaves 11 directions.*subclasses=12"):
        Distiller(TinyCNN(4), TinyCNN(8), [{"name": "lelp", "pairs": [["pool", "pool"]], "subclasses": 12}],
                  example_input=x[:2])
