"""A reader for CTranslate2's `model.bin` (binary version 6), in pure Python with numpy.

The format, little-endian:
    u32 binary_version; str spec_name; u32 spec_revision; u32 variable_count
    variable_count x { str name; u8 ndim; ndim x u32 dims; u8 dtype; u32 nbytes; nbytes of row-major data }
    u32 alias_count; alias_count x { str alias; str target }
where str = u16 byte length including a trailing NUL, then the bytes. The reader checks every length
and parses the file to its last byte, so truncation or trailing garbage is an error, not a silent misread.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from protoserve.server.demo_models.errors import CTranslate2FormatError

SUPPORTED_BINARY_VERSIONS = frozenset({6})

# dtype code -> numpy dtype as stored; bfloat16 (5) is read as uint16 and widened to float32.
DTYPE_BY_CODE: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
BFLOAT16_CODE = 5


@dataclass(frozen=True)
class CTranslate2Model:
    """The variables and aliases of a CTranslate2 model file.

    `variables` maps names to arrays (bfloat16 widened to float32; 0-d arrays for scalars);
    `aliases` maps an alias name to the variable it stands for.
    """

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        """The variable called `name`, following an alias; KeyError names what is missing."""
        target = self.aliases.get(name, name)
        if target not in self.variables:
            alias_note = f" (alias of {target!r})" if target != name else ""
            raise KeyError(f"CTranslate2 model has no variable {name!r}{alias_note}")
        return self.variables[target]


class _Cursor:
    """Reads little-endian fields from a buffer and reports where it ran out."""

    def __init__(self, data: memoryview, source: str) -> None:
        self.data = data
        self.offset = 0
        self.source = source

    def take(self, size: int, what: str) -> memoryview:
        end = self.offset + size
        if size < 0 or end > len(self.data):
            raise CTranslate2FormatError(
                f"{self.source} is truncated: {what} needs {size} bytes at offset {self.offset}, "
                f"but the file has {len(self.data)} bytes"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def unsigned(self, fmt: str, what: str) -> int:
        value: int = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]
        return value

    def string(self, what: str) -> str:
        length = self.unsigned("<H", f"length of {what}")
        raw = bytes(self.take(length, what))
        if length == 0 or raw[-1] != 0:
            raise CTranslate2FormatError(
                f"{self.source}: {what} at offset {self.offset - length} is not NUL-terminated"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as error:
            raise CTranslate2FormatError(f"{self.source}: {what} is not UTF-8 ({error})") from error


def parse_ctranslate2_model(data: bytes | bytearray | memoryview, source: str = "model.bin") -> CTranslate2Model:
    """Parse a whole model file held in memory; raises `CTranslate2FormatError` on any inconsistency."""
    cursor = _Cursor(memoryview(data), source)
    binary_version = cursor.unsigned("<I", "binary version")
    if binary_version not in SUPPORTED_BINARY_VERSIONS:
        raise CTranslate2FormatError(
            f"{source} has binary version {binary_version}; this reader supports {sorted(SUPPORTED_BINARY_VERSIONS)}"
        )
    spec_name = cursor.string("spec name")
    spec_revision = cursor.unsigned("<I", "spec revision")
    variable_count = cursor.unsigned("<I", "variable count")
    variables: dict[str, np.ndarray] = {}
    for index in range(variable_count):
        name = cursor.string(f"name of variable {index}")
        variables[name] = _read_variable(cursor, name)
    alias_count = cursor.unsigned("<I", "alias count")
    aliases: dict[str, str] = {}
    for index in range(alias_count):
        alias = cursor.string(f"alias {index}")
        target = cursor.string(f"target of alias {alias!r}")
        if target not in variables:
            raise CTranslate2FormatError(f"{source}: alias {alias!r} points to a missing variable {target!r}")
        aliases[alias] = target
    if cursor.offset != len(cursor.data):
        raise CTranslate2FormatError(
            f"{source} has {len(cursor.data) - cursor.offset} unexpected bytes after the aliases "
            f"(offset {cursor.offset})"
        )
    return CTranslate2Model(binary_version, spec_name, spec_revision, variables, aliases)


def _read_variable(cursor: _Cursor, name: str) -> np.ndarray:
    dimension_count = cursor.unsigned("<B", f"rank of {name!r}")
    shape = tuple(cursor.unsigned("<I", f"dimension {axis} of {name!r}") for axis in range(dimension_count))
    dtype_code = cursor.unsigned("<B", f"dtype of {name!r}")
    if dtype_code not in DTYPE_BY_CODE:
        raise CTranslate2FormatError(f"{cursor.source}: variable {name!r} has unknown dtype code {dtype_code}")
    dtype = DTYPE_BY_CODE[dtype_code]
    byte_count = cursor.unsigned("<I", f"byte count of {name!r}")
    expected = math.prod(shape) * dtype.itemsize
    if byte_count != expected:
        raise CTranslate2FormatError(
            f"{cursor.source}: variable {name!r} of shape {shape} and dtype code {dtype_code} "
            f"should hold {expected} bytes, the file says {byte_count}"
        )
    raw = cursor.take(byte_count, f"data of {name!r}")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    if dtype_code == BFLOAT16_CODE:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def read_ctranslate2_model(path: Path) -> CTranslate2Model:
    """Read and parse the model file at `path`."""
    return parse_ctranslate2_model(path.read_bytes(), source=str(path))
