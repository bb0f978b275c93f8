"""HTTP plumbing: bounded JSON bodies, server-sent events, and noticing a client that left."""

import asyncio
import json
from typing import AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import StreamingResponse

from .errors import ApiError, error_event

DONE = "data: [DONE]\n\n"


async def read_json(request: Request, limit: int) -> dict:
    """Return the request body, a JSON object of at most limit bytes; raise 413 or 400."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it comes: the header may be absent
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _no_constant(name: str):
    # Python's json reads NaN and Infinity, which JSON does not have and no field accepts.
    raise ValueError(f"{name} is not a JSON value")


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the limit of {limit} bytes (got at least "
                    f"{size})", code="body_too_large")


def sse(payload: dict) -> str:
    """Return payload as one server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_or_error(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Yield events, then [DONE]; an ApiError raised meanwhile is sent as an error event."""
    try:
        async for event in events:
            yield event
    except ApiError as e:
        yield sse(error_event(e))
    yield DONE


class ClosingStreamingResponse(StreamingResponse):
    """A stream of server-sent events that calls on_close however it ends: finished, failed,
    or cut short by a client that went away.

    Starlette stops iterating when the client disconnects but leaves the generator to the
    garbage collector; the engine requests behind it would run on until then.
    """

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(sse_or_error(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def unless_disconnected(request: Request, work: Awaitable):
    """Return work's result; cancel it if the client disconnects first (the caller's cleanup
    then aborts its requests)."""
    work = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        raise ApiError(499, "the client closed the connection", code="client_closed")
    return work.result()


async def _disconnected(request: Request):
    # The body has been read, so the only message left to receive is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
