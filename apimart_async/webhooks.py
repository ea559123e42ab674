"""Webhook callbacks for web backends (issue 15): the route APIMart calls when a task ends.

Submit with ``webhook_url="https://your.host/apimart"`` (``client.batch``,
``videos.generate``, ``videos.submit``) and the service POSTs the task object to
``https://your.host/apimart/callback`` when the task completes or fails. Mount that route::

    from aiohttp import web
    from apimart_async import webhooks

    app.router.add_post("/apimart/callback", webhooks.aiohttp_handler(client))

On Starlette, FastAPI or any other framework, hand the body to ``client.tasks.notify``::

    @app.post("/apimart/callback")
    async def callback(request: Request) -> Response:
        try:
            await client.tasks.notify(await request.body())
        except apimart_async.WebhookError:
            return Response(status_code=400)
        return Response(status_code=200)

A callback is unsigned and may repeat, so it is a hint, never a result: only its task id is
read, and the client's shared poller reads that task in its next status round (with every
other callback that came meanwhile) and ends the waits from what the service says. Callbacks
only reach public hosts and may be lost: tasks with a webhook are still polled, slowly (a
safety check past the predicted end, then every webhook_interval of the poll policy).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ._client import AsyncApimart
from ._errors import ClientClosedError, WebhookError

__all__ = ["aiohttp_handler"]

_logger = logging.getLogger("apimart_async")


def aiohttp_handler(client: AsyncApimart) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp request handler for ``<webhook_url>/callback`` (mount it with
    ``app.router.add_post``): 200 at once for a body that names a task (followed by this
    client or not: an unknown or repeated one is acknowledged and ignored), 400 for one that
    does not (so the service does not retry it); the task is read in the poller's next round.
    The body is never logged or echoed."""
    if not isinstance(client, AsyncApimart):
        raise TypeError(f"client must be an AsyncApimart, got {type(client).__name__}")

    async def apimart_callback(request: web.Request) -> web.Response:
        try:
            body = await request.read()  # at most the app's client_max_size (1 MiB default)
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413, text="the body is too large\n")
        except ConnectionResetError:  # the caller went away while sending it: nobody reads this
            return web.Response(status=400, text="the body did not arrive\n")
        try:
            await client.tasks.notify(body)
        except WebhookError as exc:
            _logger.info("webhook callback refused (400): %s", exc.problem)
            return web.Response(status=400, text=f"{exc.problem}\n")
        except ClientClosedError:  # shutting down: 503, so that the service sends it again
            return web.Response(status=503, text="the client is closed\n")
        return web.Response(status=200, text="ok\n")

    return apimart_callback
