"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, for every failure:
ours, the framework's (unknown path, wrong method) and unexpected ones (no traceback leaks)."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 503: "server_error"}


class ApiError(Exception):
    """A request the server answers with an error status; message names the parameter."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param=None, code=None) -> JSONResponse:
    """Return a JSONResponse holding one error in OpenAI's shape."""
    error = {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
             "code": code}
    return JSONResponse({"error": error}, status_code=status)


def error_event(error: ApiError) -> dict:
    """Return the error as the JSON object a stream sends before it ends."""
    return {"error": {"message": error.message, "type": _TYPES.get(error.status, "server_error"),
                      "param": error.param, "code": error.code}}


def install_error_handlers(app: FastAPI):
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message, e.param, e.code)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    if e.status_code == 404:
        return error_response(404, f"no route {request.method} {request.url.path}",
                              code="not_found")
    return error_response(e.status_code, str(e.detail))


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    # Our routes validate their own bodies; this only catches what FastAPI checks itself, and
    # answers as OpenAI does (400) with the field's location instead of pydantic's dump.
    first = e.errors()[0] if e.errors() else {}
    param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    return error_response(400, f"invalid request: {first.get('msg', 'bad value')}", param)


async def _unexpected_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("unexpected error serving %s %s", request.method, request.url.path)
    return error_response(500, "internal server error; the server log has the details")
