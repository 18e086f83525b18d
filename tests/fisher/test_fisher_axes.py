"""The axis table: every axis is one record that the spec, the weighter and the Distiller read, so an axis is added
by adding a record."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from fisherkd.fisher import AXES, FisherAxis, FisherBatch, FisherSpec, FisherWeighter
from fisherkd.fisher import estimators as E
from fisherkd.fisher.axes import Estimate, Importance


def test_every_axis_record_is_consistent_with_the_spec():
    for name, axis in AXES.items():
        assert axis.name == name and axis.estimators
        assert axis.needs_tap <= {"sampled", "empirical", "linear_head"}
        assert FisherSpec(axis=name).resolved_estimator == axis.estimators[0]
        if not axis.per_batch:
            assert axis.within_sample  # the grouping only applies to per-batch weights


def test_an_unknown_axis_is_a_one_line_error_naming_the_nearest():
    with pytest.raises(ValidationError, match="unknown axis 'chanel'; did you mean: channel"):
        FisherSpec(axis="chanel")


def test_an_axis_is_added_by_adding_one_record(monkeypatch):
    def margin(est: Estimate) -> Importance:
        """A made-up per-sample importance: the gap between the teacher's two most likely classes, inverted."""
        top = F.softmax(est.logits.float() / est.temperature, -1).topk(2, -1).values
        return Importance(1.0 - (top[:, 0] - top[:, 1]))

    monkeypatch.setitem(AXES, "margin", FisherAxis("margin", ("logit",), margin, per_batch=True, within_sample=False))
    spec = FisherSpec(axis="margin", gamma=1.0, clip=(0.01, 100.0))
    with pytest.raises(ValidationError, match="'margin' takes the estimators logit, not 'sampled'"):
        FisherSpec(axis="margin", estimator="sampled")
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    weights, stats = FisherWeighter(spec, "demo")(FisherBatch(torch.zeros(6, 2), torch.nn.Identity(), logits))
    top = F.softmax(logits, -1).topk(2, -1).values
    raw = 1.0 - (top[:, 0] - top[:, 1])
    assert torch.allclose(weights, raw / raw.mean(), atol=1e-6)  # mean-1 weights proportional to the importance
    assert set(stats) == {"entropy", "max_min"}


def test_statistic_axes_count_rows_by_their_weight():
    # the class axis of per-token logits: padded tokens weigh 0 in the mean over tokens
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    weighter = FisherWeighter(FisherSpec(axis="class", every=1, fraction=1.0), "demo")
    weighter(FisherBatch(torch.zeros(2, 3), torch.nn.Identity(), logits, mask=mask))
    valid = logits[mask.bool()]  # the 4 valid tokens
    assert torch.allclose(weighter.statistic.read(), E.logit_fisher_diagonal(valid).mean(0), atol=1e-7)


def test_the_records_drive_the_tap_parameter_and_one_layer_checks():
    with pytest.raises(ValueError, match="axis 'channel': the sampled estimator needs a teacher activation"):
        FisherWeighter(FisherSpec(axis="channel"), "fitnet")
    with pytest.raises(ValueError, match="axis 'parameter': no teacher parameters to weight"):
        FisherWeighter(FisherSpec(axis="parameter"), "fisher_param")
    tokens = FisherWeighter(FisherSpec(axis="token", estimator="logit"), "kd")  # a closed form: no tap needed
    with pytest.raises(ValueError, match="axis 'token': token weights from the logit Fisher need per-token logits"):
        tokens(FisherBatch(torch.zeros(2, 3), torch.nn.Identity(), torch.randn(2, 5)))

    from fisherkd.distiller import Distiller
    from helpers import TinyCNN, tiny_image_batch

    x, _ = tiny_image_batch(4)
    two_layers = {"name": "fitnet", "pairs": [["block1", "block1"], ["block2", "block2"]]}
    for axis in ("channel", "position", "direction"):
        with pytest.raises(ValueError, match=f"{axis} weights belong to one teacher layer"):
            Distiller(TinyCNN(4), TinyCNN(8), [{**two_layers, "fisher": {"axis": axis}}], x[:2])
    Distiller(TinyCNN(4), TinyCNN(8), [{**two_layers, "fisher": {"axis": "sample"}}], x[:2])  # one weight per sample
    assert [name for name, axis in AXES.items() if axis.one_layer] == ["channel", "position", "direction"]
