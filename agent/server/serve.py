"""``edge-agent serve``: the agent's app on a guarded site until SIGTERM/SIGINT.

What ``aiohttp.web.run_app`` does, with one difference that is the point: the site is
a :class:`~edgefleet.agent.server.connections.GuardedSite`, so header/body timeouts and
the connection cap apply (``run_app`` can only make a plain ``TCPSite``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.server.app import create_app
from edgefleet.agent.server.connections import GuardedSite
from edgefleet.agent.server.tls import server_ssl_context

log = logging.getLogger("edgefleet.agent")

# In-flight requests get this long to finish on SIGTERM (the unit's TimeoutStopSec is 30).
SHUTDOWN_TIMEOUT_S = 10.0


async def serve(config: AgentConfig) -> None:
    """Serve until cancelled or until a signal raises ``GracefulExit``; then drain.

    Runs on the event loop it is awaited in; the app's cleanup (models unloaded,
    executors shut down, the fleet link closed) has run when it returns or raises.
    """
    app = create_app(config)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        site = GuardedSite(
            runner,
            config.server.host,
            config.server.port,
            ssl_context=server_ssl_context(config),  # HTTPS when server.tls_* are set
        )
        await site.start()
        log.info("listening on %s", site.name)
        await asyncio.Event().wait()  # forever: SIGTERM/SIGINT raise GracefulExit
    finally:
        await runner.cleanup()


def run(config: AgentConfig, loop: asyncio.AbstractEventLoop) -> None:
    """Block in :func:`serve` on ``loop`` until a signal; closes ``loop`` at the end."""
    main = loop.create_task(serve(config))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        # The signal handler's exception left the loop with ``main`` still pending:
        # cancelling it runs its cleanup (the drain) on the loop.
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError, web.GracefulExit):
                loop.run_until_complete(main)
        _cancel_the_rest(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _cancel_the_rest(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
