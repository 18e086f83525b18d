import math

import pytest
import torch
from naive_logits import random_case

from fisherkd import functional as Fn
from fisherkd.distiller import Distiller
from fisherkd.methods import MethodInputs, create
from helpers import TinyCNN, assert_trains, tiny_image_batch


def _kd_grads(s, t, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """∂KD/∂θ and ∂KD/∂z_s at τ = 1 + 20·σ(θ), computed without any reversal."""
    theta_t = torch.tensor(theta, requires_grad=True)
    student = s.clone().requires_grad_(True)
    Fn.kd(student, t, 1.0 + 20.0 * torch.sigmoid(theta_t)).backward()
    return theta_t.grad, student.grad


def _method_grads(method, s, t, epoch) -> tuple[torch.Tensor, torch.Tensor]:
    student = s.clone().requires_grad_(True)
    method.zero_grad()
    method(MethodInputs(student, t, epoch=epoch))["ctkd"].backward()
    return method.theta.grad.clone(), student.grad


def test_ctkd_is_kd_at_the_learned_temperature():
    s, t, _ = random_case((6, 8), seed=1)
    s, t = s.float(), t.float()
    method = create("ctkd")
    tau = 1.0 + 20.0 / (1.0 + math.exp(-1.0))  # θ starts at 1, as in the authors' code
    got = method(MethodInputs(s, t, epoch=3.0))["ctkd"]
    assert math.isclose(method.temperature().item(), tau, rel_tol=1e-6)
    assert torch.allclose(got, Fn.kd(s, t, tau), rtol=1e-5)


@pytest.mark.parametrize(("epoch", "strength"), [(10.0, 1.0), (torch.tensor(25.0), 1.0), (5.0, 0.5), (0.0, 0.0)])
def test_temperature_gradient_is_reversed_on_the_cosine_curriculum(epoch, strength):
    s, t, _ = random_case((6, 8), seed=2)
    s, t = s.float(), t.float()
    method = create("ctkd")
    theta_grad, student_grad = _method_grads(method, s, t, epoch)
    plain_theta_grad, plain_student_grad = _kd_grads(s, t, 1.0)
    assert plain_theta_grad.abs().item() > 1e-6
    assert torch.allclose(theta_grad, -strength * plain_theta_grad, rtol=1e-5, atol=1e-9)
    if strength > 0:
        assert torch.sign(theta_grad) == -torch.sign(plain_theta_grad)
    # The student sees the ordinary KD gradient: only the temperature's is reversed.
    assert torch.allclose(student_grad, plain_student_grad, rtol=1e-5, atol=1e-9)


def test_kd_gradcheck_wrt_a_tensor_temperature():
    s, t, _ = random_case((3, 4), seed=3)
    tau = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda temp: Fn.kd(s, t, temp), (tau,))


def test_theta_is_trained_by_the_optimizer_to_raise_the_kd_loss():
    inputs, target = tiny_image_batch()
    torch.manual_seed(0)
    distiller = Distiller(TinyCNN(width=4), TinyCNN(width=8), [{"name": "ctkd", "weight": 1.0}])
    method = distiller.methods[0]
    assert any(p is method.theta for p in distiller.trainable_parameters())
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    before = method.theta.item()
    with torch.no_grad():
        logits, teacher_logits = distiller.student(inputs), distiller.teacher(inputs)
    ascent, _ = _kd_grads(logits, teacher_logits, before)
    distiller(inputs, target, epoch=torch.tensor(20.0)).loss.backward()
    optimizer.step()
    assert math.copysign(1.0, method.theta.item() - before) == math.copysign(1.0, ascent.item())
    distiller.close()


def test_ctkd_defaults_and_training():
    method = create("ctkd")
    h = method.hparams
    assert (h.temperature_min, h.temperature_range, h.max_reversal, h.curriculum_epochs) == (1.0, 20.0, 1.0, 10.0)
    assert method.theta.item() == 1.0 and method.default_weight == 0.9
    assert_trains({"name": "ctkd"})
