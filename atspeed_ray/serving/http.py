"""HTTP guards of the ingress: a body-size limit, validation errors that are safe to send, and
a 503 (with the traceback in the log) for anything else that fails.

* A body over ``MAX_BODY_BYTES`` gets a 413 before it is parsed (by its ``Content-Length``, or
  while a chunked body streams in).
* A 422 names the field (``detail[*].loc``) and echoes at most ``MAX_ECHO_CHARS`` of the input
  that was wrong; values JSON cannot encode (``NaN``, ``Infinity``, ``1e400`` parse as floats)
  are echoed as text. Each 422 is logged in one line.
* A body JSON cannot be read from gets a 400 that says why (``body_problem``): not UTF-8 (the
  byte and its position), nested too deeply, an integer over Python's digit limit. FastAPI's
  own answer names nothing ("There was an error parsing the body").
* A 503 (a failure, the server stopping) carries ``Retry-After``: recommendation calls are
  idempotent, send them again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from atspeed_ray.serving.config import MAX_BODY_BYTES

MAX_ECHO_CHARS = 200
RETRY_AFTER_S = 1  # the Retry-After of a 503: the request is safe to send again (idempotent)

logger = logging.getLogger("ray.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def too_large(limit: int) -> HTTPException:
    return HTTPException(status_code=413, detail=f"request body over {limit} bytes")


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, before anything parses it."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = JSONResponse(status_code=413, content={"detail": too_large(self.limit).detail})
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:  # a chunked body: count as it arrives
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large(self.limit)  # FastAPI's body reader re-raises HTTPExceptions
            return message

        await self.app(scope, limited, send)


def echo(value: Any) -> Any:
    """``value`` if it is valid JSON of at most ``MAX_ECHO_CHARS``, else a shortened text of it."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):  # NaN, inf, bytes, ...
        text = repr(value)
        return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."
    return value if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."


def loc_text(loc: Any) -> str:
    return ".".join(str(part) for part in loc)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 shape (``type``, ``loc``, ``msg``, ``input``) with a safe, short ``input``."""
    errors = [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg"),
               "input": echo(e.get("input"))} for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": ""}
    logger.info("422 %s %s: %d error(s), first %s: %s", request.method, request.url.path,
                len(errors), loc_text(first["loc"]), first["msg"])
    return JSONResponse(status_code=422, content={"detail": errors})


def field_error(loc: list[str | int], msg: str, value: Any, kind: str = "value_error") -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors (``detail[*].loc`` names the field)."""
    return HTTPException(status_code=422, detail=[{"type": kind, "loc": loc, "msg": msg, "input": echo(value)}])


def body_problem(exc: BaseException | None) -> str | None:
    """Why the JSON parser could not read a body (the cause of FastAPI's 400), or None."""
    if isinstance(exc, UnicodeDecodeError):
        return f"body is not valid UTF-8: byte 0x{exc.object[exc.start]:02x} at position {exc.start}"
    if isinstance(exc, RecursionError):
        return "body JSON is nested too deeply"
    if isinstance(exc, ValueError) and "integer string conversion" in str(exc):
        return "body has an integer too long to read: " + str(exc).split(";")[0]
    return None


async def bad_body(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's 400 for a body its JSON parser failed on, with the reason in FastAPI's error
    shape (``detail[*].loc`` = ``["body"]``); every other HTTP error as FastAPI answers it."""
    problem = body_problem(exc.__cause__) if exc.status_code == 400 else None
    if problem is None:
        return await http_exception_handler(request, exc)
    logger.info("400 %s %s: %s", request.method, request.url.path, problem)
    return JSONResponse(status_code=400, content={"detail": [
        {"type": "json_invalid", "loc": ["body"], "msg": problem}]})


def stopping(detail: str) -> HTTPException:
    """A 503 for a request that came after the stop began: retry (another replica, later); the
    connection is closed so that a client does not send its next request on it."""
    return HTTPException(status_code=503, detail=detail,
                         headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})


async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed: %s", exc)
    return JSONResponse(status_code=503, content={"detail": f"temporarily unavailable: {type(exc).__name__}"},
                        headers={"Retry-After": str(RETRY_AFTER_S)})


def install(app: FastAPI, max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """The guards above on ``app``."""
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, bad_body)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
