"""Starting and stopping a translator on a TCP address (used by the CLI and by tests)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from protoserve.translator.app import make_app
from protoserve.translator.config import TranslatorConfig


@dataclass
class RunningTranslator:
    """A started translator: its runner and the address it listens on."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_translator(config: TranslatorConfig, host: str = "127.0.0.1", port: int = 0) -> RunningTranslator:
    """Serve `make_app(config)` on host:port (0 picks a free port). Client disconnects cancel handlers."""
    runner = web.AppRunner(make_app(config), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1] if runner.addresses else port
    return RunningTranslator(runner=runner, host=host, port=bound_port)
