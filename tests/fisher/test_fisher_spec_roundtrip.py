"""A run's config.yaml holds every field of a fisher block, defaults included: it must validate again as it was
(resume, compare --resume, eval and export all read it back)."""

import pytest

from fisherkd.fisher import AXES, FisherSpec


@pytest.mark.parametrize("axis", sorted(AXES))
def test_a_saved_fisher_block_validates_again_unchanged(axis):
    spec = FisherSpec(axis=axis)
    assert FisherSpec.model_validate(spec.model_dump(mode="json")) == spec
