"""Fixtures of the translator tests: a fake gRPC upstream and a translator in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from fake_upstream import FakeUpstream, running_translator
from protoserve.translator.server import RunningTranslator


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def translator(upstream: FakeUpstream) -> AsyncIterator[RunningTranslator]:
    async with running_translator(upstream) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
