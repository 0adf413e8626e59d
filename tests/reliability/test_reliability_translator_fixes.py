"""Defects the reliability suite found in the translator, pinned by fast unit tests."""

from __future__ import annotations

import pytest
from protoserve.translator.body import parse_json_object
from protoserve.translator.errors import ApiError


@pytest.mark.parametrize(
    "raw",
    [
        b'{"content": "\\ud800"}',
        b'{"content": "a\\uDFFFb"}',
        b'{"messages": [{"content": ["x", "\\udc00"]}]}',
        b'{"\\ud83d": 1}',
    ],
)
def test_lone_surrogate_escapes_are_400(raw: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        parse_json_object(raw)
    assert caught.value.status == 400
    assert "surrogate" in str(caught.value)


def test_surrogate_pairs_and_literal_backslashes_still_parse() -> None:
    assert parse_json_object(b'{"content": "\\ud83d\\ude00"}') == {"content": "\U0001f600"}
    assert parse_json_object(b'{"content": "\\\\ud800"}') == {"content": "\\ud800"}
