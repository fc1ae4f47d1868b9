"""Stored parameters: written and read by hand, in exactly the form protobuf's
JSON mapping gives, so rows written before and after read the same."""

from __future__ import annotations

import math

import pytest
from google.protobuf import json_format

from services.contracts import gen
from services.generation import convert

VALUES = [
    gen.ParameterValue(string_value="a cat, \u00e9t\u00e9 \U0001f408"),
    gen.ParameterValue(string_value=""),
    gen.ParameterValue(int_value=0),
    gen.ParameterValue(int_value=-(2**63)),
    gen.ParameterValue(int_value=2**63 - 1),
    gen.ParameterValue(number_value=7.5),
    gen.ParameterValue(number_value=0.0),
    gen.ParameterValue(number_value=-1e-300),
    gen.ParameterValue(number_value=math.inf),
    gen.ParameterValue(number_value=-math.inf),
    gen.ParameterValue(number_value=math.nan),
    gen.ParameterValue(bool_value=False),
    gen.ParameterValue(bool_value=True),
    gen.ParameterValue(image_name="in.png"),
    gen.ParameterValue(),
]


@pytest.mark.parametrize("value", VALUES, ids=[str(v).strip() or "empty" for v in VALUES])
def test_a_parameter_is_stored_as_protobufs_json_mapping_and_read_back(
    value: gen.ParameterValue,
) -> None:
    stored = convert.parameter_json(value)
    assert stored == json_format.MessageToDict(value)
    read, expected = gen.ParameterValue(), gen.ParameterValue()
    convert.set_parameter(read, stored)
    json_format.ParseDict(json_format.MessageToDict(value), expected)
    assert read.WhichOneof("kind") == expected.WhichOneof("kind")
    assert str(read) == str(expected)  # NaN is not equal to itself: compare the text


def _event_row(seq: int) -> dict[str, object]:
    return {
        "generation_id": "6b0f7c1e-6a3c-4b9e-9f1e-0a5b0c2d3e4f",
        "seq": seq,
        "type": "PROGRESS",
        "status": "RUNNING",
        "payload": '{"value": 3, "max": 30, "node": "3"}',
        "created_at": None,
    }


def test_watchers_of_an_event_share_one_response_holding_it() -> None:
    # 1,000 watchers of a generation get one message, not 1,000 copies.
    first = convert.watch_response(_event_row(7))
    again = convert.watch_response(_event_row(7))
    assert again is first
    assert first.event == convert.event(_event_row(7))
    assert (first.event.sequence, first.event.progress.value) == (7, 3)
    assert convert.watch_response(_event_row(8)).event.sequence == 8
