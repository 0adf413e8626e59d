"""Errors of image loading. Each is an `InvalidRequestError`, so callers answer INVALID_ARGUMENT / 400."""

from __future__ import annotations

from protoserve.server.engine.errors import InvalidRequestError


class ImageRejectedError(InvalidRequestError):
    """The image cannot be used: bad source, not an image, too large, or not allowed by the policy."""


class ImageFetchError(ImageRejectedError):
    """A remote image could not be fetched (refused address, redirect, timeout, HTTP error, size)."""
