"""`srvit serve`: flags from the settings object, start-up before binding, uvicorn with a draining SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.lifecycle import Service, StartupError
from service.repository import RepositoryError
from service.settings import Settings

log = logging.getLogger("service")

DEVICE_HUNG = 3  # exit status after a device hang (a batch past device_timeout_s)
GRACEFUL_CLOSE_S = 5.0  # after draining, for uvicorn to close idle keep-alive connections
ENV_ONLY = {"api_key"}  # secrets: SRVIT_API_KEY or SRVIT_API_KEY_FILE, never in argv where `ps` shows them


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, so flags and SRVIT_* variables can never drift apart; a flag overrides its variable."""
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        default = field.default if not isinstance(field.default, tuple) else ",".join(map(str, field.default))
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            metavar=name.split("_")[-1].upper(),
            help=f"{field.description} [SRVIT_{name.upper()}, default {default}]",
        )


def main(args: argparse.Namespace) -> int:
    """0 after a clean shutdown (SIGTERM drains first), 2 when the settings or the repository are unusable, 3
    after the device hung (exits without waiting for its thread)."""
    try:
        settings = settings_from(args)
    except ValidationError as e:
        print(f"srvit serve: bad settings:\n{e}", file=sys.stderr)
        return 2
    configure_logging(settings)
    code = asyncio.run(serve(settings))
    if code == DEVICE_HUNG:  # the stuck device thread would keep a normal exit waiting for it forever
        logging.shutdown()
        os._exit(code)
    return code


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a request line's fields (never a body)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "request", None)
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), **(fields if isinstance(fields, dict) else {})}  # fmt: skip
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JsonLines() if settings.log_format == "json" else text)
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])


def settings_from(args: argparse.Namespace) -> Settings:
    """Flags given on the command line override SRVIT_* variables; flags left out leave them alone."""
    return Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})


async def serve(settings: Settings) -> int:
    app = create_app(settings)
    service: Service = app.state.service
    try:
        await service.start()  # before binding: a broken repository never gets a port, just a message
    except (RepositoryError, StartupError) as e:
        print(f"srvit serve: cannot start: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=GRACEFUL_CLOSE_S, log_config=None, access_log=False,
                            server_header=False)  # no server software or version in responses  # fmt: skip
    try:
        await DrainingServer(config, service).serve()
    finally:
        await service.stop()  # a forced exit skips the lifespan's shutdown
    return DEVICE_HUNG if service.device is not None and service.device.hung else 0


class DrainingServer(uvicorn.Server):
    """The first SIGTERM or SIGINT leaves, then drains, before uvicorn stops: /readyz turns 503 at once while new
    requests are still served for shutdown_delay_s (balancers stop routing here meanwhile); then new requests get
    503 not_ready while the socket stays open, and admitted and queued work finishes within drain_timeout_s. A
    second signal cuts the delay short; one during the drain stops at once. Unlike uvicorn, the signal is not
    re-raised afterwards, so a drained server exits 0."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None:
            self.should_exit = self.force_exit = True
            return
        name = signal.Signals(sig).name
        if self._signalled:
            self._loop.call_soon_threadsafe(self._signalled_again, name)
            return
        self._signalled = True
        log.info("%s: unready, serving for %.1f s more, then draining and exiting", name,
                 self.service.settings.shutdown_delay_s)  # fmt: skip
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _signalled_again(self, name: str) -> None:
        if self.service.cut_delay_short():
            log.info("%s again: shutdown delay cut short, draining", name)
        else:
            self.should_exit = self.force_exit = True

    def _begin_drain(self) -> None:
        self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.service.leave()
        finally:
            self.should_exit = True
