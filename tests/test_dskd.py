"""DSKD's dual-space loss (fisherkd.functional.cross_tokenizer.dskd_loss) against a per-pair loop of the formula,
an identity case, and where its gradients go. The trainer run is in tests/hf/test_cross_tokenizer_trainer.py."""

import pytest
import torch
from torch import nn

from fisherkd.functional import dskd_loss

torch.set_num_threads(1)

V_S, V_T, D_S, D_T = 7, 11, 3, 5


def problem(seed: int = 0, n_student: int = 6, n_teacher: int = 5, pairs: int = 9) -> dict:
    """Random float64 logits, hidden states, heads, projectors and pairs (a student row paired twice)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    s_rows = torch.randint(0, n_student, (pairs,), generator=g)
    s_rows[1:2] = s_rows[:1]
    return dict(
        student_logits=torch.randn(n_student, V_S, generator=g, dtype=torch.float64).mul(2).requires_grad_(),
        teacher_logits=torch.randn(n_teacher, V_T, generator=g, dtype=torch.float64).mul(3).requires_grad_(),
        student_hidden=torch.randn(pairs, D_S, generator=g, dtype=torch.float64).requires_grad_(),
        teacher_hidden=torch.randn(pairs, D_T, generator=g, dtype=torch.float64).requires_grad_(),
        student_head=torch.randn(V_S, D_S, generator=g, dtype=torch.float64).requires_grad_(),
        teacher_head=torch.randn(V_T, D_T, generator=g, dtype=torch.float64).requires_grad_(),
        student_to_teacher=nn.Linear(D_S, D_T).double(),
        teacher_to_student=nn.Linear(D_T, D_S).double(),
        targets=torch.randint(0, V_S, (pairs,), generator=g),
        student_rows=s_rows,
        teacher_rows=torch.randint(0, n_teacher, (pairs,), generator=g),
    )


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return sum(a * (a.log() - b.log()) for a, b in zip(p, q))


def naive(x: dict, temperature: float, correct_only: bool, weight=None) -> torch.Tensor:
    """Σ_r w_r·ℓ_r / P, ℓ_r written out pair by pair from the paper's terms (sg = detach)."""
    total = 0.0
    pairs = len(x["targets"])
    for r in range(pairs):
        z_s = x["student_logits"][x["student_rows"][r]]
        z_t = x["teacher_logits"][x["teacher_rows"][r]].detach()
        u = x["teacher_head"].detach() @ x["student_to_teacher"](x["student_hidden"][r])
        v = x["student_head"].detach() @ x["teacher_to_student"](x["teacher_hidden"][r].detach())
        y = int(x["targets"][r])
        teacher_space = kl(torch.softmax(z_t / temperature, 0), torch.softmax(u / temperature, 0))
        student_space = kl(torch.softmax(v / temperature, 0).detach(), torch.softmax(z_s / temperature, 0))
        m = float(int(v.argmax()) == y) if correct_only else 1.0
        ce = -torch.log(torch.softmax(v, 0)[y])
        w = 1.0 if weight is None else float(weight[r])
        total = total + w * (teacher_space + m * student_space + ce)
    return total / pairs


def grads(x: dict, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    names = ["student_logits", "student_hidden", "teacher_logits", "teacher_hidden", "student_head", "teacher_head"]
    for name in names:
        x[name].grad = None
    for module in (x["student_to_teacher"], x["teacher_to_student"]):
        module.zero_grad(set_to_none=True)
    loss.backward()
    out = {name: x[name].grad for name in names}
    for key in ("student_to_teacher", "teacher_to_student"):
        out |= {f"{key}.{n}": p.grad for n, p in x[key].named_parameters()}
    return out


@pytest.mark.parametrize("correct_only", [True, False])
@pytest.mark.parametrize(("temperature", "chunk_size"), [(1.0, None), (2.0, 2), (0.7, 1)])
def test_the_loss_and_its_gradients_are_the_per_pair_loop(temperature, chunk_size, correct_only):
    x = problem()
    # the projected teacher predicts a few labels right, so the correct_only mask has both values
    with torch.no_grad():
        v = (x["student_head"] @ x["teacher_to_student"](x["teacher_hidden"]).T).T
    x["targets"][:3] = v[:3].argmax(-1)
    weight = torch.linspace(0.5, 1.5, len(x["targets"]))
    loss = dskd_loss(
        **x, temperature=temperature, correct_only=correct_only, chunk_size=chunk_size, sample_weight=weight
    )
    expected = naive(x, temperature, correct_only, weight)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    got, want = grads(x, loss), grads(x, expected)
    assert got.keys() == want.keys()
    for name in got:
        if want[name] is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_gradients_reach_the_student_and_both_projectors_not_the_teacher():
    x = problem(seed=1)
    x["targets"] = (x["student_head"] @ x["teacher_to_student"](x["teacher_hidden"]).T).T.argmax(-1).detach()
    g = grads(x, dskd_loss(**x))
    for name in ("student_logits", "student_hidden"):
        assert g[name] is not None and g[name].abs().sum() > 0, name
    for name in [k for k in g if "." in k]:  # every weight and bias of both projectors
        assert g[name] is not None and g[name].abs().sum() > 0, name
    for name in ("teacher_logits", "teacher_hidden", "teacher_head", "student_head"):
        assert g[name] is None, name  # the teacher is frozen; the student's head is read without gradient


def test_identity_projectors_on_one_space_give_twice_the_kl_plus_the_teachers_cross_entropy():
    # One hidden size and one head W, logits z = W·h: u = z_s and v = z_t, so that
    # dskd = KL(p_t ‖ p_s) [teacher's space] + KL(p_t ‖ p_s) [student's space] + CE(softmax(z_t), y)
    g = torch.Generator().manual_seed(3)
    head = torch.randn(V_S, D_S, generator=g, dtype=torch.float64)
    h_s = torch.randn(8, D_S, generator=g, dtype=torch.float64)
    h_t = torch.randn(8, D_S, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V_S, (8,), generator=g)
    z_s, z_t = h_s @ head.T, h_t @ head.T
    identity = nn.Identity()
    for tau in (1.0, 2.0):
        loss = dskd_loss(z_s, z_t, h_s, h_t, head, head, identity, identity, y, tau, correct_only=False)
        plain_kl = torch.nn.functional.kl_div(
            torch.log_softmax(z_s / tau, -1), torch.log_softmax(z_t / tau, -1), log_target=True, reduction="batchmean"
        )
        ce = torch.nn.functional.cross_entropy(z_t, y)
        torch.testing.assert_close(loss, 2 * plain_kl + ce, rtol=1e-12, atol=1e-12)
    # the same models on both sides and labels they predict: only the cross-entropy of the teacher is left
    same = dskd_loss(z_s, z_s, h_s, h_s, head, head, identity, identity, z_s.argmax(-1), 2.0)
    torch.testing.assert_close(same, torch.nn.functional.cross_entropy(z_s, z_s.argmax(-1)), rtol=1e-12, atol=0)


def test_sum_reduction_and_no_pairs():
    x = problem(seed=2)
    mean = dskd_loss(**x)
    torch.testing.assert_close(dskd_loss(**x, reduction="sum"), mean * len(x["targets"]))
    empty = problem(seed=2, pairs=0)
    loss = dskd_loss(**empty)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert empty["student_logits"].grad.abs().sum() == 0


def test_bfloat16_logits_and_heads_stay_close_to_float32():
    x = problem(seed=4)
    x |= {k: v.float() for k, v in x.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    x |= {k: x[k].float() for k in ("student_to_teacher", "teacher_to_student")}
    half = x | {
        k: x[k].detach().bfloat16() for k in ("student_logits", "teacher_logits", "student_head", "teacher_head")
    }
    torch.testing.assert_close(dskd_loss(**half).float(), dskd_loss(**x), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(student_hidden=torch.zeros(3, D_S)), r"student_hidden must hold one hidden state per aligned pair"),
        (dict(teacher_head=torch.zeros(V_T - 1, D_T)), r"teacher_head must be the LM head's weight \[11"),
        (dict(student_to_teacher=nn.Linear(D_S, D_T + 1).double()), r"student_to_teacher must map .* \[9, 5\]"),
        (dict(targets=torch.full((9,), V_S)), r"targets must lie in \[0, 7\)"),
        (dict(targets=torch.zeros(8, dtype=torch.long)), r"targets has 8 entries for 9 aligned pairs"),
        (dict(temperature=0.0), r"temperature must be positive"),
        (dict(chunk_size=0), r"chunk_size must be a positive number of rows"),
        (dict(reduction="none"), r"reduction must be 'mean' or 'sum'"),
    ],
)
def test_errors(change, message):
    with pytest.raises(ValueError, match=message) as error:
        dskd_loss(**(problem() | change))
    assert "\n" not in str(error.value)
