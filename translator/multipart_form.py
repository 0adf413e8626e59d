"""Reading a multipart/form-data upload within limits: the file part is counted as it arrives and
refused (413) as soon as it passes the audio limit, the whole body as soon as it passes the body limit."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web
from protoserve.translator.body import check_declared_length, too_large, undecodable_body
from protoserve.translator.errors import ApiError, invalid_request

_READ_CHUNK_BYTES = 64 * 1024
_MAX_TEXT_FIELD_BYTES = 64 * 1024


@dataclass
class UploadedForm:
    """The text fields of a form (last value wins) and its one file."""

    fields: dict[str, str] = field(default_factory=dict)
    file_bytes: bytes | None = None
    file_name: str = ""
    file_content_type: str = ""


async def _read_part(part: BodyPartReader, limit: int, on_too_large: ApiError) -> bytes:
    received = bytearray()
    while chunk := await part.read_chunk(_READ_CHUNK_BYTES):
        received += chunk
        if len(received) > limit:
            raise on_too_large
    return bytes(received)


async def read_form(request: web.Request, file_field: str, max_file_bytes: int, max_body_bytes: int) -> UploadedForm:
    """Parse a multipart form with one file in `file_field`; 415 for another content type."""
    if request.content_type != "multipart/form-data":
        raise ApiError(
            415, f"send the upload as multipart/form-data, not {request.content_type}", code="unsupported_media_type"
        )
    check_declared_length(request, max_body_bytes)
    form = UploadedForm()
    total = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise invalid_request("nested multipart parts are not supported")
            name = part.name or ""
            if name == file_field:
                data = await _read_part(part, max_file_bytes, too_large(max_file_bytes, "the uploaded file"))
                form.file_bytes = data
                form.file_name = part.filename or ""
                form.file_content_type = part.headers.get("Content-Type", "")
            else:
                data = await _read_part(
                    part, _MAX_TEXT_FIELD_BYTES, invalid_request(f"form field '{name}' is too long", param=name)
                )
                try:
                    form.fields[name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise invalid_request(f"form field '{name}' is not valid UTF-8", param=name) from None
            total += len(data)
            if total > max_body_bytes:
                raise too_large(max_body_bytes)
    except ValueError as error:  # aiohttp's parser rejects malformed multipart bodies with ValueError
        raise invalid_request(f"malformed multipart body: {error}") from None
    except web.RequestPayloadError as error:
        raise undecodable_body(error) from None
    return form
