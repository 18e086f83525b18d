import math

import pytest
import torch

from fisherkd import functional as Fn
from fisherkd.methods import create
from helpers import assert_trains


def naive_mi_alpha(scores: torch.Tensor, log_baseline: torch.Tensor, alpha: float) -> float:
    """−I_α with plain loops: S[k][j] = f(student k, teacher j), joint pairs on the diagonal."""
    s, b = scores.tolist(), log_baseline.tolist()
    n = len(s)
    bound = 1.0
    for j in range(n):
        m = sum(math.exp(s[k][j]) for k in range(n)) / n
        d = alpha * m + (1 - alpha) * math.exp(b[j])
        joint = s[j][j] - math.log(d)
        marginal = sum(math.exp(s[k][j]) / d for k in range(n)) / n
        bound += (joint - marginal) / n
    return -bound


def random_scores(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g, dtype=torch.float64) * 2, torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n", [2, 5, 9])
@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.5, 0.9, 1.0])
def test_mi_alpha_matches_naive_loop(n, alpha):
    scores, baseline = random_scores(n, seed=n)
    assert math.isclose(Fn.mi_alpha(scores, baseline, alpha).item(), naive_mi_alpha(scores, baseline, alpha),
                        rel_tol=1e-9, abs_tol=1e-12)


def test_alpha_one_is_infonce_and_ignores_the_baseline():
    scores, baseline = random_scores(6, seed=1)
    infonce = (scores.diagonal() - scores.logsumexp(0) + math.log(6)).mean()
    torch.testing.assert_close(-Fn.mi_alpha(scores, baseline, 1.0), infonce)
    torch.testing.assert_close(-Fn.mi_alpha(scores, baseline + 5.0, 1.0), infonce)
    assert -Fn.mi_alpha(scores * 100, baseline, 1.0).item() <= math.log(6) + 1e-9  # InfoNCE never exceeds log N


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_the_optimal_critic_recovers_the_mutual_information_of_correlated_gaussians(alpha):
    # x, y standard normal with correlation ρ: I(x; y) = −½·log(1 − ρ²); the optimal critic is
    # f(x, y) = log p(y|x) − log p(y) with q(y) = 1, where every I_α is tight up to the batch estimates
    rho, n = 0.8, 3000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g, dtype=torch.float64)
    var = 1 - rho**2
    scores = -((y[None, :] - rho * x[:, None]) ** 2) / (2 * var) - 0.5 * math.log(var) + y[None, :] ** 2 / 2
    mutual_information = -0.5 * math.log(var)
    estimate = -Fn.mi_alpha(scores, torch.zeros(n, dtype=torch.float64), alpha).item()
    assert abs(estimate - mutual_information) < 0.05


def test_mi_alpha_gradcheck_and_sample_weights():
    scores, baseline = random_scores(4, seed=2)
    scores.requires_grad_(True)
    baseline.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, b: Fn.mi_alpha(s, b, 0.3), (scores, baseline))
    weights = torch.tensor([2.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    per_sample = [Fn.mi_alpha(scores, baseline, 0.3, sample_weight=torch.eye(4, dtype=torch.float64)[j] * 4)
                  for j in range(4)]
    expected = sum(w * v for w, v in zip(weights, per_sample)) / 4
    torch.testing.assert_close(Fn.mi_alpha(scores, baseline, 0.3, sample_weight=weights), expected)


def test_mi_alpha_defaults_and_training():
    method = create("mi_alpha")
    assert (method.hparams.alpha, method.hparams.hidden_dim, method.hparams.embed_dim) == (0.5, 256, 128)
    assert method.min_pairs == 1 and method.max_pairs is None
    assert_trains({"name": "mi_alpha", "pairs": [["block2", "block2"], ["pool", "pool"]]}, lr=1e-3)
