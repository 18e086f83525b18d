import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.methods import MethodInputs, create
from helpers import assert_trains


def naive_relation(s, t, mask=None, sample_weight=None):
    # s, t: B×T×D tokens; per sample 1 − cosine between the valid entries of the token cosine-similarity matrices
    def cosine(a, b):
        return sum(u * v for u, v in zip(a, b)) / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))

    total, count = 0.0, 0
    for b in range(s.shape[0]):
        valid = [i for i in range(s.shape[1]) if mask is None or mask[b, i]]
        if not valid:
            continue
        ts, tt = s[b].tolist(), t[b].tolist()
        vs = [cosine(ts[i], ts[j]) for i in valid for j in valid]
        vt = [cosine(tt[i], tt[j]) for i in valid for j in valid]
        total += (1.0 if sample_weight is None else float(sample_weight[b])) * (1.0 - cosine(vs, vt))
        count += 1
    return total / count


@pytest.mark.parametrize(("s_shape", "t_shape"), [((3, 4, 5), (3, 4, 2)), ((2, 6, 3), (2, 6, 8))])
def test_relation_matches_naive_loop(s_shape, t_shape):
    s, t = torch.randn(s_shape, dtype=torch.float64), torch.randn(t_shape, dtype=torch.float64)
    sw = torch.rand(s_shape[0], dtype=torch.float64) + 0.5
    assert math.isclose(Fn.relation(s, t).item(), naive_relation(s, t), rel_tol=1e-9)
    assert math.isclose(Fn.relation(s, t, sample_weight=sw).item(), naive_relation(s, t, None, sw), rel_tol=1e-9)
    assert Fn.relation(s, t, sample_weight=torch.ones(s_shape[0])).item() == Fn.relation(s, t).item()


def test_relation_respects_the_token_mask():
    s, t = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    value = Fn.relation(s, t, mask=mask)
    assert math.isclose(value.item(), naive_relation(s, t, mask), rel_tol=1e-9)
    s2 = s.clone()
    s2[0, 3:] = 100 * torch.randn(2, 4, dtype=torch.float64)  # padding and fully masked samples do not count
    s2[2] = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(Fn.relation(s2, t, mask=mask), value, rtol=1e-12)
    with pytest.raises(ValueError, match="mask"):
        Fn.relation(s, t, mask=torch.ones(3, 4))


def test_relation_maps_are_position_tokens_and_token_scale_does_not_matter():
    s, t = torch.randn(2, 3, 2, 4, dtype=torch.float64), torch.randn(2, 5, 2, 4, dtype=torch.float64)
    tokens_s, tokens_t = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)
    assert math.isclose(Fn.relation(s, t).item(), naive_relation(tokens_s, tokens_t), rel_tol=1e-9)
    scale = torch.rand(2, 8, 1, dtype=torch.float64) + 0.1
    assert torch.allclose(Fn.relation(tokens_s * scale, tokens_t), Fn.relation(s, t), rtol=1e-10)
    assert Fn.relation(s, s.clone()).abs().item() < 1e-12


def test_relation_gradcheck_and_bfloat16():
    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.autograd.gradcheck(lambda a: Fn.relation(a, t, mask=mask), (s,))
    s, t = torch.randn(8, 16, 32), torch.randn(8, 16, 64)
    low, high = Fn.relation(s.bfloat16(), t.bfloat16()), Fn.relation(s, t)
    assert torch.isfinite(low) and abs(low.item() - high.item()) < 0.05 * high.item()


def test_relation_method_mask_switch():
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    inputs = MethodInputs(torch.zeros(2, 2), student_features=[s], teacher_features=[t], mask=mask)
    assert torch.allclose(create("relation")(inputs)["relation"], Fn.relation(s, t, mask=mask))
    assert torch.allclose(create("relation", use_mask=False)(inputs)["relation"], Fn.relation(s, t))


def test_relation_trains():
    assert_trains({"name": "relation", "pairs": [["block2", "block2"]]})
