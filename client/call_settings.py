"""Settings every call of a client shares: the API key's metadata, the default deadline and priority."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protoserve.client.channel import api_key_metadata
from protoserve.client.errors import InvalidArgument
from protoserve.client.request_building import RequestTags

HEALTH_TIMEOUT_SECONDS = 5.0


def check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    """A deadline in seconds must be a positive number (or None for no deadline)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise InvalidArgument(f"{what} must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


@dataclass(frozen=True)
class CallSettings:
    """What a client adds to every call. `timeout` is the default gRPC deadline in seconds (None: none)."""

    api_key: str | None = None
    timeout: float | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if self.api_key is not None and (not isinstance(self.api_key, str) or "\n" in self.api_key):
            raise InvalidArgument("api_key must be a string on one line")
        check_timeout(self.timeout)

    @property
    def metadata(self) -> Sequence[tuple[str, str]]:
        return tuple(api_key_metadata(self.api_key))

    def timeout_for(self, timeout: float | None) -> float | None:
        """The deadline of one call: its own `timeout`, else the client's."""
        return check_timeout(timeout) if timeout is not None else self.timeout

    def tags(self, request_id: str, priority: int | None, user: str) -> RequestTags:
        return RequestTags(request_id=request_id, priority=self.priority if priority is None else priority, user=user)
