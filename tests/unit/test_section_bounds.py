"""Config sections with a lower and an upper bound refuse a lower bound above the upper one, naming
both fields and their values; equal bounds are accepted."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from monitoring.config import Window
from ray_apps.manifests import WorkerSpec
from serve_deployments.config import Autoscaling


@pytest.mark.parametrize(("section", "fields", "message"), [
    (Window, {"instances": 100, "min_instances": 150}, "min_instances 150 is above instances 100"),
    (Autoscaling, {"min_replicas": 3, "max_replicas": 2}, "min_replicas 3 is above max_replicas 2"),
    (WorkerSpec, {"min_replicas": 5, "max_replicas": 4}, "worker.min_replicas 5 is above worker.max_replicas 4"),
])
def test_a_lower_bound_above_the_upper_one_is_refused_naming_both(section, fields, message):
    with pytest.raises(ValidationError, match=message):
        section(**fields)
    low, high = fields
    assert section(**{low: fields[high], high: fields[high]})  # equal is fine
