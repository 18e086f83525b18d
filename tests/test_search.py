"""DisWOT student search: the score against loop-computed definitions and hand cases, the spaces, the seeded
evolution, the budget, rank correlations, and `fisherkd search-student` end to end."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
import yaml

from fisherkd.cli import main
from fisherkd.config import build_config
from fisherkd.errors import UserError
from fisherkd.models import create_model
from fisherkd.search import (
    CNN1DSpace,
    MLPSpace,
    ResNetSpace,
    Scorer,
    class_activation,
    diswot_score,
    evolve,
    gram,
    gram_distance,
    kendall_tau,
    make_space,
    rank_correlation,
    readout,
    relation_distance,
    semantic_distance,
    spearman,
)


def loop_gram(x):
    x = x.reshape(len(x), -1).tolist()
    return [[sum(a * b for a, b in zip(x[i], x[j])) for j in range(len(x))] for i in range(len(x))]


def loop_distance(g, h):
    """(1/n²) Σ_ij (g_ij/‖g_i‖ − h_ij/‖h_i‖)², in plain Python."""
    n = len(g)
    total = 0.0
    for i in range(n):
        ng, nh = math.sqrt(sum(v * v for v in g[i])), math.sqrt(sum(v * v for v in h[i]))
        total += sum((g[i][j] / ng - h[i][j] / nh) ** 2 for j in range(n))
    return total / n**2


def test_gram_is_the_matrix_of_inner_products():
    x = torch.randn(5, 3, 4)
    assert torch.allclose(gram(x), torch.tensor(loop_gram(x)), atol=1e-5)


def test_gram_distance_hand_case():
    # rows of [[3, 4], [0, 2]] normalised: [[0.6, 0.8], [0, 1]]; against the identity the differences are
    # (0.4, -0.8) and (0, 0): (0.16 + 0.64) / 2² = 0.2
    a, b = torch.eye(2), torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert gram_distance(a, b).item() == pytest.approx(0.2)
    assert gram_distance(a, a).item() == 0
    with pytest.raises(ValueError, match="n×n matrices of one shape"):
        gram_distance(torch.eye(2), torch.eye(3))


def test_class_activation_is_the_head_weight_gradient():
    # hand case: z = (0, 0) so p = (1/2, 1/2), y = 0, f = (2,): (p - onehot) f = (-1, 1)
    assert class_activation(torch.tensor([[2.0]]), torch.zeros(1, 2), torch.tensor([0])).tolist() == [[-1.0], [1.0]]
    # and in general the gradient of mean cross-entropy w.r.t. a linear head's weight, by autograd
    head = torch.nn.Linear(6, 4)
    f, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    F.cross_entropy(head(f), y).backward()
    assert torch.allclose(class_activation(f, head(f).detach(), y), head.weight.grad, atol=1e-6)


def test_semantic_and_relation_distances_against_loops_for_different_widths():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (6,))
    t_head, s_head = torch.nn.Linear(7, 3), torch.nn.Linear(2, 3)
    t_f, s_f = torch.randn(6, 7), torch.randn(6, 2)
    cams = []
    for head, f in ((t_head, t_f), (s_head, s_f)):  # the CAM as an autograd gradient, its Gram by loops
        F.cross_entropy(head(f), y).backward()
        cams.append(loop_gram(head.weight.grad))
    expected = loop_distance(*cams)
    got = semantic_distance(t_f, t_head(t_f).detach(), s_f, s_head(s_f).detach(), y).item()
    assert got == pytest.approx(expected, rel=1e-5)
    t_map, s_map = torch.randn(6, 4, 5), torch.randn(6, 9)
    assert relation_distance(t_map, s_map).item() == pytest.approx(
        loop_distance(loop_gram(t_map), loop_gram(s_map)), rel=1e-5
    )


def test_relation_distance_ignores_scale_and_rotation_of_features():
    t = torch.randn(8, 5)
    q, _ = torch.linalg.qr(torch.randn(5, 5))
    assert relation_distance(t, 3.0 * t @ q).item() == pytest.approx(0, abs=1e-10)
    assert relation_distance(t, torch.randn(8, 5)).item() > 1e-3
    assert diswot_score(0.25, 0.5) == -0.75


def test_readout_takes_the_last_stage_before_pooling_and_the_head_input():
    resnet = create_model("resnet8", in_channels=3, num_classes=10)
    out = readout(resnet, torch.randn(2, 3, 16, 16))
    assert out.stage_map.shape == (2, 64, 4, 4) and out.features.shape == (2, 64) and out.logits.shape == (2, 10)
    mlp = create_model("mlp", in_channels=1, num_classes=10, hidden=(7, 5))
    out = readout(mlp, torch.randn(3, 40))
    assert out.stage_map.shape == (3, 5) and torch.equal(out.stage_map, out.features)
    assert readout(create_model("cnn1d", 1, 10), torch.randn(2, 40)).stage_map.shape == (2, 25, 5)


@pytest.mark.parametrize("space", [MLPSpace(), CNN1DSpace(), ResNetSpace(), ResNetSpace(base="resnet8x4")])
def test_sampled_and_mutated_candidates_are_buildable_and_stay_in_the_space(space):
    rng = random.Random(0)
    image = space.family == "resnet"
    shape = (3, 16, 16) if image else (40,)
    fixed = space.fit(shape, 3 if image else 1)
    for _ in range(8):
        genome = space.sample(rng)
        for _ in range(4):
            genome = space.mutate(genome, rng)
        name, kwargs = space.build(genome)
        model = create_model(name, 3 if image else 1, 10, **fixed, **kwargs)
        assert model(torch.randn(2, *shape)).shape == (2, 10)
        if space.family == "mlp":
            assert len(kwargs["hidden"]) in space.depths and set(kwargs["hidden"]) <= set(space.widths)
        if space.family == "resnet":
            assert set(kwargs["blocks"]) <= set(space.blocks) and len(kwargs["inner"]) == sum(kwargs["blocks"])
            widths = [model.layer1[0].conv2[0].out_channels, model.layer3[0].conv2[0].out_channels]
            assert widths == ([16, 64] if space.base == "resnet8" else [64, 256])


def tiny_scorer(seed=0):
    torch.manual_seed(0)
    teacher = create_model("cnn1d", 1, 10).eval()
    batches = [(torch.randn(32, 40), torch.randint(0, 10, (32,))) for _ in range(2)]
    return Scorer(teacher, batches, 1, 10, {"mlp": {"in_features": 40}}, seed=seed)


def test_evolution_is_deterministic_by_seed_and_keeps_the_budget():
    space = MLPSpace(depths=(1, 2, 3), widths=(8, 16, 32, 64, 128))
    runs = [evolve([space], tiny_scorer(), population=4, generations=2, budget=6000, seed=s) for s in (3, 3, 4)]
    first, again, other = ([c.record() for c in r.ranked] for r in runs)
    assert first == again and first != other
    for c in runs[0].ranked:
        model = create_model(c.name, 1, 10, in_features=40, **c.kwargs)
        assert sum(p.numel() for p in model.parameters()) == c.params <= 6000
    assert [c.score for c in runs[0].ranked] == sorted((c.score for c in runs[0].ranked), reverse=True)
    assert len(runs[0].population) == 4 and len(runs[0].history) == 3
    # the same candidate gets the same init and score whatever the search met before it
    scorer = tiny_scorer()
    best = runs[0].ranked[0]
    assert scorer.score(best.name, best.kwargs) == (best.semantic, best.relation)
    # averaging over two inits: the first is that init, the second another one
    scorer.inits = 2
    two = scorer.score(best.name, best.kwargs)
    assert two != (best.semantic, best.relation) and all(math.isfinite(v) for v in two)


def test_survivors_never_get_worse_across_generations():
    result = evolve([MLPSpace(), CNN1DSpace()], tiny_scorer(), population=3, generations=3, seed=0)
    best = [h["best_score"] for h in result.history]
    assert best == sorted(best)
    assert {c.name for c in result.ranked} <= {"mlp", "cnn1d"}


def test_errors_are_one_line_and_say_the_fix():
    with pytest.raises(UserError, match="no candidate of the search space fits --budget 100 parameters"):
        evolve([MLPSpace()], tiny_scorer(), population=2, generations=1, budget=100)
    with pytest.raises(UserError, match="unknown search space family 'mpl'; did you mean: mlp"):
        make_space("mpl")
    with pytest.raises(UserError, match="search space mlp: unknown option 'width'; its options are depths, widths"):
        make_space({"family": "mlp", "width": [3]})
    with pytest.raises(UserError, match="mlp widths must be a non-empty list of numbers >= 1"):
        make_space({"family": "mlp", "widths": []})
    with pytest.raises(UserError, match="'vgg8' is not a CIFAR ResNet"):
        make_space("resnet:vgg8")
    scorer = tiny_scorer()
    with pytest.raises(UserError, match="cannot take this data's inputs"):
        evolve([ResNetSpace()], scorer, population=1, generations=0)


def test_rank_correlations_hand_case_and_ties():
    # y swaps ranks 2 and 3: Spearman 1 - 6 * 2 / (4 * 15) = 0.8; Kendall (5 - 1) / 6 pairs = 2/3
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    # ties: x = (1, 1, 2), y = (1, 2, 3): P = 2, Q = 0, n0 = 3, n1 = 1, n2 = 0: τ-b = 2 / sqrt(2 * 3)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = [3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]
    result = rank_correlation(x, y)
    assert result["spearman"] == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert result["kendall"] == pytest.approx(scipy_stats.kendalltau(x, y).statistic)


def tiny_config(tmp_path, **extra):
    config = {
        "name": "tiny",
        "data": {"name": "mnist1d"},
        "teacher": {"name": "cnn1d", "train": {"epochs": 1, "batch_size": 200}},
        "student": {"name": "mlp"},
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_search_student_command_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    path, out = tiny_config(tmp_path), tmp_path / "search"
    args = ["search-student", str(path), "--population", "3", "--generations", "1", "--budget", "20000"]
    assert main([*args, "--batches", "2", "--output", str(out)]) == 0
    assert "DisWOT ranking for teacher cnn1d" in capsys.readouterr().out
    report = json.loads((out / "search.json").read_text())
    assert report["teacher"]["source"] == "trained" and report["provenance"]["torch"] == torch.__version__
    assert all(c["params"] <= 20000 for c in report["ranking"]) and report["best"] == report["ranking"][0]
    student = yaml.safe_load((out / "best_student.yaml").read_text())["student"]
    assert student == {"name": "mlp", "kwargs": report["best"]["kwargs"]}
    build_config({"student": student})  # a valid student block for a run config
    # again: the teacher now comes from the cache and the search repeats exactly
    assert main([*args, "--batches", "2", "--output", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "search.json").read_text())
    assert again["teacher"]["source"] == "cache" and again["ranking"] == report["ranking"]


def test_search_student_command_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "no_teacher.yaml"
    path.write_text(yaml.safe_dump({"student": {"name": "mlp"}}))
    assert main(["search-student", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: search-student scores students against a teacher: add a teacher: {name: ...} block"]
    assert main(["search-student", str(tiny_config(tmp_path)), "--space", "mlp,cnn2d"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown search space family 'cnn2d'; did you mean: cnn1d"
    )
    assert main(["search-student", str(tiny_config(tmp_path)), "--population", "0"]) == 2
    assert "--population: must be at least 1" in capsys.readouterr().err
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"spaces": [{"family": "cnn1d"}, {"family": "mlp", "width": [8]}]}))
    assert main(["search-student", str(tiny_config(tmp_path)), "--space-file", str(space_file)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: search space mlp: unknown option 'width'; its options are depths, widths"
    )
    vgg = tiny_config(tmp_path, student={"name": "vgg8"})
    assert main(["search-student", str(vgg)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: the config's student 'vgg8' has no search space: give --space mlp, cnn1d or resnet"
    )
