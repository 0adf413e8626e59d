from protoserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TranscribeRequest(_message.Message):
    __slots__ = ("model", "audio", "filename", "language", "prompt", "temperature", "task", "options")
    class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TASK_TRANSCRIBE: _ClassVar[TranscribeRequest.Task]
        TASK_TRANSLATE: _ClassVar[TranscribeRequest.Task]
    TASK_TRANSCRIBE: TranscribeRequest.Task
    TASK_TRANSLATE: TranscribeRequest.Task
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    audio: bytes
    filename: str
    language: str
    prompt: str
    temperature: float
    task: TranscribeRequest.Task
    options: _common_pb2.RequestOptions
    def __init__(self, model: _Optional[str] = ..., audio: _Optional[bytes] = ..., filename: _Optional[str] = ..., language: _Optional[str] = ..., prompt: _Optional[str] = ..., temperature: _Optional[float] = ..., task: _Optional[_Union[TranscribeRequest.Task, str]] = ..., options: _Optional[_Union[_common_pb2.RequestOptions, _Mapping]] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("id", "start", "end", "text", "token_ids", "avg_logprob")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    AVG_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: float
    end: float
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    avg_logprob: float
    def __init__(self, id: _Optional[int] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., avg_logprob: _Optional[float] = ...) -> None: ...

class TranscriptionChunk(_message.Message):
    __slots__ = ("request_id", "segments", "text_delta", "done", "text", "language", "duration", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    text_delta: str
    done: bool
    text: str
    language: str
    duration: float
    model: str
    def __init__(self, request_id: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., text_delta: _Optional[str] = ..., done: _Optional[bool] = ..., text: _Optional[str] = ..., language: _Optional[str] = ..., duration: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...
