"""The CTranslate2 model.bin reader, on small files written here byte by byte."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from protoserve.server.demo_models import CTranslate2FormatError
from protoserve.server.demo_models.ctranslate2_reader import parse_ctranslate2_model, read_ctranslate2_model

DTYPE_CODES = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}


def encode_string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def encode_variable(name: str, array: np.ndarray, dtype_code: int, data: bytes | None = None) -> bytes:
    payload = array.tobytes() if data is None else data
    header = encode_string(name) + struct.pack("<B", array.ndim)
    header += b"".join(struct.pack("<I", dimension) for dimension in array.shape)
    return header + struct.pack("<BI", dtype_code, len(payload)) + payload


def encode_model(
    variables: list[bytes], aliases: list[tuple[str, str]], *, version: int = 6, spec: str = "WhisperSpec"
) -> bytes:
    data = struct.pack("<I", version) + encode_string(spec) + struct.pack("<II", 3, len(variables))
    data += b"".join(variables) + struct.pack("<I", len(aliases))
    return data + b"".join(encode_string(alias) + encode_string(target) for alias, target in aliases)


def bfloat16_bytes(values: np.ndarray) -> bytes:
    """The upper halves of float32 values: exact for values with 8 significant bits."""
    return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()


@pytest.fixture
def sample_arrays() -> dict[str, np.ndarray]:
    return {
        "float32": np.arange(6, dtype="<f4").reshape(2, 3) / 4,
        "int8": np.array([-3, 0, 7], dtype="i1"),
        "int16": np.array([[-300], [1200]], dtype="<i2"),
        "int32": np.array(123456, dtype="<i4"),  # a scalar: ndim 0
        "float16": np.array([0.5, -1.25, 2048.0], dtype="<f2"),
    }


def sample_file(sample_arrays: dict[str, np.ndarray]) -> bytes:
    variables = [encode_variable(f"group/{kind}", array, DTYPE_CODES[kind]) for kind, array in sample_arrays.items()]
    bfloat16_values = np.array([[1.0, -2.5], [0.15625, 384.0]], dtype="<f4")
    variables.append(encode_variable("group/bfloat16", bfloat16_values, 5, bfloat16_bytes(bfloat16_values)))
    return encode_model(variables, [("decoder/projection/weight", "group/float16")])


def test_reads_every_dtype_shape_and_alias(tmp_path: Path, sample_arrays: dict[str, np.ndarray]) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(sample_file(sample_arrays))
    model = read_ctranslate2_model(path)
    assert (model.binary_version, model.spec_name, model.spec_revision) == (6, "WhisperSpec", 3)
    for kind, array in sample_arrays.items():
        loaded = model.variables[f"group/{kind}"]
        assert loaded.dtype == array.dtype and loaded.shape == array.shape
        np.testing.assert_array_equal(loaded, array)
    bfloat16 = model.variables["group/bfloat16"]
    assert bfloat16.dtype == np.float32
    np.testing.assert_array_equal(bfloat16, [[1.0, -2.5], [0.15625, 384.0]])
    assert model.aliases == {"decoder/projection/weight": "group/float16"}
    np.testing.assert_array_equal(model.get("decoder/projection/weight"), sample_arrays["float16"])


def test_missing_variable_is_a_key_error_naming_it(sample_arrays: dict[str, np.ndarray]) -> None:
    model = parse_ctranslate2_model(sample_file(sample_arrays))
    with pytest.raises(KeyError, match="no/such"):
        model.get("no/such")


@pytest.mark.parametrize("cut", [1, 7, 30, 60, -40, -1])
def test_truncated_file_is_a_clear_error(sample_arrays: dict[str, np.ndarray], cut: int) -> None:
    data = sample_file(sample_arrays)
    truncated = data[:cut] if cut > 0 else data[:cut]
    with pytest.raises(CTranslate2FormatError, match="truncated|NUL"):
        parse_ctranslate2_model(truncated, source="cut.bin")


def test_trailing_bytes_are_an_error(sample_arrays: dict[str, np.ndarray]) -> None:
    with pytest.raises(CTranslate2FormatError, match="unexpected bytes"):
        parse_ctranslate2_model(sample_file(sample_arrays) + b"\0\0")


def test_unsupported_binary_version_is_an_error() -> None:
    with pytest.raises(CTranslate2FormatError, match="binary version 5"):
        parse_ctranslate2_model(encode_model([], [], version=5))


def test_alias_to_a_missing_variable_is_an_error() -> None:
    variables = [encode_variable("present", np.zeros(2, dtype="<f4"), 0)]
    with pytest.raises(CTranslate2FormatError, match="missing variable 'absent'"):
        parse_ctranslate2_model(encode_model(variables, [("alias", "absent")]))


def test_byte_count_that_disagrees_with_the_shape_is_an_error() -> None:
    array = np.zeros(4, dtype="<f4")
    variables = [encode_variable("short", array, 0, array.tobytes()[:12])]
    with pytest.raises(CTranslate2FormatError, match="should hold 16 bytes"):
        parse_ctranslate2_model(encode_model(variables, []))


def test_unknown_dtype_code_is_an_error() -> None:
    variables = [encode_variable("odd", np.zeros(2, dtype="<f4"), 9)]
    with pytest.raises(CTranslate2FormatError, match="unknown dtype code 9"):
        parse_ctranslate2_model(encode_model(variables, []))


def test_empty_model_parses() -> None:
    model = parse_ctranslate2_model(encode_model([], [], spec="TransformerSpec"))
    assert model.spec_name == "TransformerSpec" and model.variables == {} and model.aliases == {}
