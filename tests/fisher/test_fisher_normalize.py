"""The normalization operator: exact ones at γ=0/λ=0, the DESIGN formula where the clip is idle, mean 1 and the clip
always (checked against a bisection on the scale), masks, and the λ ramp."""

import pytest
import torch

from fisherkd.fisher import normalize, ramp


def design_formula(r: torch.Tensor, gamma: float, lam: float, floor: float = 1e-3) -> torch.Tensor:
    """DESIGN §4 without the clip: r̃ = max(r, floor·mean r); u = r̃^γ; w = (1−λ) + λ·u/mean(u)."""
    r = r.double()
    r_tilde = torch.maximum(r, floor * r.mean())
    u = r_tilde**gamma
    return (1 - lam) + lam * u / u.mean()


def bisection_scale(v: torch.Tensor, lo: float, hi: float) -> float:
    """The s with mean(clip(s·v, lo, hi)) = 1, by 200 bisection steps on a float64 copy."""
    v = v.double()
    a, b = 1e-12, 1e12
    for _ in range(200):
        s = (a * b) ** 0.5
        if (s * v).clamp(lo, hi).mean() < 1:
            a = s
        else:
            b = s
    return (a * b) ** 0.5


@pytest.mark.parametrize("gamma, lam", [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0)])
def test_gamma_or_lambda_zero_gives_exact_ones(gamma, lam):
    r = torch.rand(7, 33) ** 4
    assert torch.equal(normalize(r, gamma, lam), torch.ones(7, 33))


def test_matches_the_design_formula_when_the_clip_is_idle():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(50, generator=g) + 0.5  # importances within a factor 3: no weight reaches the clip
    for gamma, lam in [(1.0, 1.0), (0.5, 1.0), (2.0, 0.3)]:
        expected = design_formula(r, gamma, lam)
        assert expected.min() > 0.1 and expected.max() < 10
        assert torch.allclose(normalize(r, gamma, lam).double(), expected, atol=1e-6)


def test_mean_one_and_the_clip_hold_exactly_where_clip_then_renormalize_would_break_them():
    r = torch.full((100,), 1e-3)
    r[0] = 1e4  # u/mean u ≈ 100 for one entry: clipping at 10 and dividing by the new mean pushes it to ≈ 50
    w = normalize(r, 1.0, 1.0, clip=(0.1, 10.0))
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert w.max().item() <= 10.0 + 1e-5 and w.min().item() >= 0.1 - 1e-6
    naive = (design_formula(r, 1.0, 1.0).clamp(0.1, 10.0))
    assert (naive / naive.mean()).max() > 10  # the recipe this operator improves on


def test_random_importances_match_the_bisection_solution():
    g = torch.Generator().manual_seed(1)
    for trial in range(120):
        n = int(torch.randint(1, 60, (1,), generator=g))
        r = torch.rand(n, generator=g) ** 12 * 100
        if trial % 4 == 0:
            r = r.round()  # ties and exact zeros
        gamma = float(torch.rand((), generator=g)) * 3
        lam = float(torch.rand((), generator=g))
        lo, hi = 0.05 + 0.9 * float(torch.rand((), generator=g)), 1 + 5 * float(torch.rand((), generator=g))
        w = normalize(r, gamma, lam, clip=(lo, hi)).double()
        v = design_formula(r, gamma, lam) if r.max() > 0 else torch.ones(n, dtype=torch.float64)  # 0/0: uniform
        expected = (bisection_scale(v, lo, hi) * v).clamp(lo, hi)
        assert w.mean().item() == pytest.approx(1.0, abs=1e-5), trial
        assert lo - 1e-6 <= w.min().item() and w.max().item() <= hi + 1e-5, trial
        assert torch.allclose(w, expected, atol=1e-4), trial


def test_rows_are_normalized_separately_and_masked_entries_are_left_out():
    g = torch.Generator().manual_seed(2)
    r = torch.rand(4, 12, generator=g) ** 6
    mask = torch.rand(4, 12, generator=g) > 0.3
    mask[:, 0] = True
    w = normalize(r, 1.0, 1.0, mask=mask, clip=(0.2, 5.0))
    for row in range(4):
        valid = w[row][mask[row]]
        assert valid.mean().item() == pytest.approx(1.0, abs=1e-5)
        alone = normalize(r[row][mask[row]], 1.0, 1.0, clip=(0.2, 5.0))
        assert torch.allclose(valid, alone, atol=1e-6)  # padding does not change the valid weights
    assert torch.equal(w[~mask], torch.ones(int((~mask).sum())))
    columns = normalize(r.T, 1.0, 1.0, dim=0, clip=(0.2, 5.0))
    assert torch.allclose(columns.T, normalize(r, 1.0, 1.0, clip=(0.2, 5.0)))


def test_dead_entries_are_floored_and_all_zero_rows_are_uniform():
    w = normalize(torch.tensor([0.0, 1.0, 1.0, 1.0]), 1.0, 1.0, clip=(1e-6, 1e6))
    assert w[0] > 0 and w[0] / w[1] == pytest.approx(1e-3 * 0.75, rel=1e-4)  # floor·mean r = 7.5e-4
    assert torch.equal(normalize(torch.zeros(5)), torch.ones(5))


def test_bad_clip_is_rejected():
    with pytest.raises(ValueError, match="lo <= 1 <= hi"):
        normalize(torch.rand(3), clip=(2.0, 10.0))


def test_lambda_ramps_linearly_then_stays():
    assert [ramp(s, 0.8, 4) for s in (0, 1, 2, 4, 100)] == [0.0, 0.2, 0.4, 0.8, 0.8]
    assert ramp(0, 0.8, 0) == 0.8
