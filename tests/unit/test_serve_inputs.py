"""Request parsing and instance checks without Ray: what an attacker can put in a body gets a 4xx
naming the field, never an exception that would fail a batch.

Run: .venv/bin/python -m pytest tests/unit/test_serve_inputs.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from serve_deployments.config import Limits
from serve_deployments.instances import InstanceError, InstanceSpec
from serve_deployments.protocol import ApiError, V2Request, check_outputs, parse_v2

DIGITS = InstanceSpec("digits", "image", 64, 4096)
REVIEWS = InstanceSpec("reviews", "text", None, 10)


def _v2(shape, data, datatype="FP32"):
    return json.dumps({"inputs": [{"name": "features", "shape": shape, "datatype": datatype, "data": data}]}).encode()


@pytest.mark.parametrize("body, status, message", [
    (_v2([1] * 65, [1]), 422, "65 dimensions; at most 8"),
    (_v2([2**62, 2**62, 4], [1]), 422, "a dimension above 2147483648"),
    (_v2([0, 2**70], []), 422, "a dimension above 2147483648"),  # holds no values, yet numpy cannot shape it
    (_v2([1], [10**400]), 422, "data[0]: beyond the range of FP32"),
    (_v2([1], [-(10**30)], "INT64"), 422, "data[0]: beyond the range of INT64"),
    (_v2([1, -2], [1]), 422, "negative dimension"),
    (_v2([2**31] * 4, [1]), 422, "1 values for shape"),  # each dimension in bounds, the product past int64
])
def test_v2_shapes_and_numbers_out_of_range_are_4xx(body, status, message):
    with pytest.raises(ApiError) as err:
        parse_v2(body, None)
    assert err.value.status == status and message in err.value.message


def test_v2_in_range_values_parse():
    _, tensors = parse_v2(_v2([1, 2], [3e38, -1]), None)
    assert tensors["features"].dtype == np.float32 and tensors["features"].shape == (1, 2)


@pytest.mark.parametrize("instances, message", [
    ([[10**400] + [0] * 63], "instances[0]: a number beyond float32's range"),
    ([[0] * 64, [1e39] + [0] * 63], "instances[1]: a value is not finite or beyond float32's range"),
    ([[0] * 63], "shape [1, 63]; digits takes 8x8 images or rows of 64 pixel values"),
    (["text"], "instances[0]: digits takes 8x8 images or rows of 64 pixel values, not text"),
    ([[0] * 64, [0] * 10], "expected 8x8 images or rows of 64 pixel values, all of the same shape"),
])
def test_numeric_instances_are_checked_with_the_index_named(instances, message):
    with pytest.raises(InstanceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DIGITS.check(instances)


def test_good_instances_come_back_as_the_engine_takes_them():
    rows = DIGITS.check([[[0] * 8] * 8, [[1.5] * 8] * 8])
    assert rows.dtype == np.float32 and rows.shape == (2, 64)
    assert REVIEWS.check(["fine"]) == ["fine"]
    for bad, message in (([1], "expected a text string"), ([" "], "empty text"), (["x" * 11], "the limit is 10")):
        with pytest.raises(InstanceError, match=message):
            REVIEWS.check(bad)


def test_a_text_with_an_unpaired_surrogate_is_refused_before_it_can_break_a_batch():
    texts = json.loads('["fine", "\\ud800 x"]')  # valid JSON; no tokenizer takes the result
    with pytest.raises(InstanceError, match=r"instances\[1\]: text holds an unpaired surrogate"):
        REVIEWS.check(texts)


def test_a_boolean_binary_data_size_is_not_a_size():
    header = json.dumps({"inputs": [{"name": "features", "shape": [1], "datatype": "FP32",
                                     "parameters": {"binary_data_size": True}}]}).encode()
    with pytest.raises(ApiError, match="binary_data_size True does not fit"):
        parse_v2(header + b"\0", str(len(header)))


def test_unknown_outputs_are_refused_before_the_model_runs():
    one = [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]
    check_outputs(V2Request.model_validate({"inputs": one, "outputs": [{"name": "label"}]}))
    with pytest.raises(ApiError, match="unknown output 'logits'"):
        check_outputs(V2Request.model_validate({"inputs": one, "outputs": [{"name": "logits"}]}))


def test_error_messages_that_echo_client_input_are_cut():
    assert len(ApiError(422, "x" * 100_000).message) < 520


def test_slow_bodies_cannot_take_every_slot_of_a_replica():
    Limits(max_bodies_in_flight=8, max_ongoing_requests=9)
    with pytest.raises(ValueError, match=r"max_bodies_in_flight \(128\) must be below max_ongoing_requests \(128\)"):
        Limits(max_bodies_in_flight=128, max_ongoing_requests=128)
