import math

import pytest
import torch
import torch.nn.functional as F

from fisherkd import functional as Fn
from fisherkd.distiller import Distiller
from fisherkd.methods import MethodInputs, create
from helpers import TinyCNN, tiny_image_batch


def naive_crd(anchor, positive, negatives, num_data, tau, z=None, sample_weight=None):
    a, p = anchor.tolist(), positive.tolist()
    n = len(a)
    rows = [[p[b]] + (negatives.tolist() if negatives.dim() == 2 else negatives[b].tolist()) for b in range(n)]
    scores = [[math.exp(sum(u * v for u, v in zip(a[b], c)) / tau) for c in rows[b]] for b in range(n)]
    if z is None:
        z = num_data * sum(map(sum, scores)) / sum(map(len, scores))
    m = (len(rows[0]) - 1) / num_data
    total = 0.0
    for b in range(n):
        probs = [s / z for s in scores[b]]
        term = math.log(probs[0] / (probs[0] + m + 1e-7)) + sum(math.log(m / (q + m + 1e-7)) for q in probs[1:])
        total -= (1.0 if sample_weight is None else float(sample_weight[b])) * term
    return total / n


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize(("batch", "k", "dim", "num_data"), [(3, 4, 5, 50), (2, 7, 3, 10)])
def test_crd_nce_matches_naive_loop(batch, k, dim, num_data):
    anchor, positive, negatives = unit(batch, dim), unit(batch, dim), unit(batch, k, dim)
    sw = torch.rand(batch, dtype=torch.float64) + 0.5
    value = Fn.crd_nce(anchor, positive, negatives, num_data=num_data, temperature=0.07)
    assert math.isclose(value.item(), naive_crd(anchor, positive, negatives, num_data, 0.07), rel_tol=1e-9)
    value = Fn.crd_nce(
        anchor, positive, negatives, num_data=num_data, temperature=0.5, normalizer=3.0, sample_weight=sw
    )
    assert math.isclose(value.item(), naive_crd(anchor, positive, negatives, num_data, 0.5, 3.0, sw), rel_tol=1e-9)
    z = Fn.crd_normalizer(anchor, positive, negatives, num_data=num_data)
    assert Fn.crd_nce(anchor, positive, negatives, num_data=num_data, normalizer=z).item() == pytest.approx(
        Fn.crd_nce(anchor, positive, negatives, num_data=num_data).item(), rel=1e-12
    )


def test_crd_nce_shared_negatives_equal_per_sample_copies():
    anchor, positive, queue = unit(4, 6), unit(4, 6), unit(9, 6)
    shared = Fn.crd_nce(anchor, positive, queue, num_data=100)
    copied = Fn.crd_nce(anchor, positive, queue.expand(4, 9, 6), num_data=100)
    assert torch.allclose(shared, copied, rtol=1e-12)
    assert math.isclose(shared.item(), naive_crd(anchor, positive, queue, 100, 0.07), rel_tol=1e-9)


def test_crd_nce_gradcheck_and_bfloat16():
    anchor = unit(3, 4).requires_grad_()
    positive, negatives = unit(3, 4), unit(3, 5, 4)
    assert torch.autograd.gradcheck(
        lambda a: Fn.crd_nce(a, positive, negatives, num_data=20, temperature=0.5, normalizer=2.0), (anchor,)
    )
    anchor, positive, negatives = (x.float() for x in (unit(8, 128), unit(8, 128), unit(8, 64, 128)))
    low = Fn.crd_nce(anchor.bfloat16(), positive.bfloat16(), negatives.bfloat16(), num_data=1000)
    high = Fn.crd_nce(anchor, positive, negatives, num_data=1000)
    assert torch.isfinite(low) and abs(low.item() - high.item()) < 0.05 * high.item()


def crd_inputs(index=None, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(batch, 2, 2, generator=g), torch.randn(batch, 5, generator=g)
    return MethodInputs(torch.zeros(batch, 2), student_features=[s], teacher_features=[t], index=index)


def built_crd(**hparams):
    """A CRD method whose heads are built from the shapes of ``crd_inputs`` (4 student, 5 teacher values)."""
    method = create("crd", **hparams)
    example = crd_inputs()
    method.setup(example.student_features, example.teacher_features)
    return method


def test_crd_needs_num_data_and_builds_its_heads_from_shapes():
    with pytest.raises(TypeError, match="num_data.*one memory-bank row per dataset index"):
        create("crd")
    method = create("crd", num_data=10, embed_dim=8)
    with pytest.raises(RuntimeError, match="example_input="):
        method(crd_inputs(torch.tensor([0, 1, 2])))
    method = built_crd(num_data=10, embed_dim=8)
    assert (method.embed_student.in_features, method.embed_teacher.in_features) == (4, 5)
    assert method.embed_student.out_features == method.embed_teacher.out_features == 8


def test_crd_memory_bank_moves_only_the_rows_at_the_batch_indices():
    method = built_crd(num_data=10, nce_k=6, embed_dim=8)
    assert method.hparams.temperature == 0.07 and method.hparams.momentum == 0.5 and method.default_weight == 0.8
    assert create("crd", num_data=10).hparams.nce_k == 16384
    before_s, before_t = method.student_memory.clone(), method.teacher_memory.clone()
    index = torch.tensor([2, 7, 4])
    inputs = crd_inputs(index)
    assert torch.isfinite(method(inputs)["crd"])
    e_s = F.normalize(method.embed_student(inputs.student_features[0].flatten(1)), dim=1).detach()
    e_t = F.normalize(method.embed_teacher(inputs.teacher_features[0]), dim=1).detach()
    assert torch.allclose(method.student_memory[index], F.normalize(0.5 * before_s[index] + 0.5 * e_s, dim=1))
    assert torch.allclose(method.teacher_memory[index], F.normalize(0.5 * before_t[index] + 0.5 * e_t, dim=1))
    others = torch.tensor([0, 1, 3, 5, 6, 8, 9])
    assert torch.equal(method.student_memory[others], before_s[others])
    assert torch.equal(method.teacher_memory[others], before_t[others])
    z = method.normalizers.clone()
    assert (z > 0).all()
    method(crd_inputs(torch.tensor([0, 1, 2]), seed=1))
    assert torch.equal(method.normalizers, z)  # Z is estimated once, on the first batch
    frozen = method.student_memory.clone()
    method.eval()(crd_inputs(torch.tensor([5, 6, 8])))
    assert torch.equal(method.student_memory, frozen)  # evaluation leaves the memory alone
    with pytest.raises(ValueError, match="index="):
        method(crd_inputs())


def test_crd_queue_is_a_bounded_fifo():
    method = built_crd(num_data=1000, queue_size=5, embed_dim=8)
    assert method.student_memory.shape == method.teacher_memory.shape == (5, 8)
    embeddings = []
    for step in range(4):
        inputs = crd_inputs(seed=step)
        assert torch.isfinite(method(inputs)["crd"])  # no index needed
        embeddings.append(F.normalize(method.embed_student(inputs.student_features[0].flatten(1)), dim=1).detach())
        assert method.student_memory.shape == (5, 8)
    assert int(method.queue_pointer) == (4 * 3) % 5
    # 12 embeddings went through a queue of 5: rows hold the last five, written at positions 7..11 mod 5
    latest = torch.cat(embeddings)[-5:]
    rows = torch.arange(7, 12) % 5
    assert torch.allclose(method.student_memory[rows], latest)
    big = built_crd(num_data=1000, queue_size=2, embed_dim=8)
    big(crd_inputs(batch=3))  # a batch larger than the queue keeps its last rows
    assert big.student_memory.shape == (2, 8) and int(big.queue_pointer) == 0


def train_crd(batches: int, **hparams) -> list[float]:
    """Adam steps cycling over ``batches`` fixed batches of 16 (with their dataset indices); mean loss per cycle."""
    torch.manual_seed(0)
    x, y = tiny_image_batch(16 * batches)
    spec = {"name": "crd", "weight": 1.0, "pairs": [["block2", "block2"]]}
    distiller = Distiller(TinyCNN(width=4), TinyCNN(width=8), [{**spec, **hparams}], example_input=x[:2])
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-2)
    losses = []
    for step in range(40):
        index = torch.arange(16) + 16 * (step % batches)
        out = distiller(x[index], y[index], index=index)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    distiller.close()
    assert all(math.isfinite(v) for v in losses)
    return [sum(losses[i : i + batches]) / batches for i in range(0, 40, batches)]


def test_crd_trains_with_a_bank_and_with_a_queue():
    bank = train_crd(1, num_data=100, nce_k=64)
    assert bank[-1] < 0.5 * bank[0]
    # a queue holding the same samples as the batch would make them their own negatives: cycle over 4 batches
    queue = train_crd(4, num_data=64, queue_size=32)
    assert queue[-1] < queue[0]
