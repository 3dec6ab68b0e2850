"""Errors answered as OpenAI does, {"error": {"message", "type", "param", "code"}}, for every
failure an HTTP client can meet: invalid bodies, unknown paths, over-limit and overload answers,
and unexpected failures (logged, answered without internals)."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from deployments.http.guard import error_body
from deployments.http.protocol import ErrorResponse

logger = logging.getLogger("ray.serve")


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: "dict[str, str] | None" = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers
        self.code = code


def error_response(error: APIError) -> Response:
    body = error_body(error.message, error.kind, error.param, error.code)
    return Response(body, status_code=error.status, headers=error.headers, media_type="application/json")


ERRORS = {
    400: {"model": ErrorResponse, "description": "Invalid request; the message names the field."},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key (when the server has keys)."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
    413: {"model": ErrorResponse, "description": "Request body larger than the server's limit."},
    422: {"model": ErrorResponse, "description": "Over a server limit: prompt length or pixel budget."},
    429: {"model": ErrorResponse, "description": "Too many requests in flight; see Retry-After."},
    503: {"model": ErrorResponse, "description": "A stage's queue is full; see Retry-After."},
    504: {"model": ErrorResponse, "description": "The request ran past the server's timeout."},
}


async def _api_error(_: Request, error: APIError) -> Response:
    return error_response(error)


async def _http_error(_: Request, error: HTTPException) -> Response:
    """Unknown paths, wrong methods, unparseable bodies: the same error shape as everything else."""
    kinds = {404: "not_found_error", 405: "invalid_request_error"}
    message = error.detail if isinstance(error.detail, str) else "invalid request"
    return error_response(
        APIError(error.status_code, message, kind=kinds.get(error.status_code, "invalid_request_error"))
    )


async def _unexpected(_: Request, error: Exception) -> Response:
    """A bug or an unforeseen failure: logged here, answered without internals."""
    logger.exception("unexpected error", exc_info=error)
    return error_response(APIError(500, "internal error; it has been logged", kind="server_error"))


async def _invalid_body(_: Request, error: RequestValidationError) -> Response:
    first = error.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return error_response(APIError(400, "request body is not valid JSON"))
    if first.get("type") == "missing" and not loc:
        return error_response(APIError(400, "request body is required"))
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    return error_response(APIError(400, f"{param}: {message}" if param else message, param))


def install_error_handlers(app: FastAPI) -> None:
    """Every error path of the app answers in the one shape."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(RequestValidationError, _invalid_body)
