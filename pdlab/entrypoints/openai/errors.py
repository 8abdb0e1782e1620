"""Every failure as OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.

User errors (4xx) are answered and logged on one line, never with a
traceback; only a failure of the server itself (5xx) is logged in full.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdlab.entrypoints.openai.protocol import ErrorInfo, ErrorResponse
from pdlab.errors import PdlabError

log = logging.getLogger("pdlab.api_server")


class APIError(Exception):
    """An error to answer with `status` and OpenAI's body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return _AsciiJSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


class _AsciiJSONResponse(JSONResponse):
    """An error message may quote what the client sent, lone surrogates included: escape, never fail."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def invalid_request(error: PdlabError) -> APIError:
    """A `PdlabError` about a request (e.g. `SamplingParams`' "invalid sampling parameter top_p=2: ...")."""
    message = str(error)
    match = re.match(r"invalid sampling parameter (\w+)=", message)
    return APIError(400, message, param=match.group(1) if match else None)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's list of validation errors -> one 400 naming the first bad field."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    kind = first.get("type", "")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if kind == "json_invalid":
        why = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return APIError(400, f"the request body is not valid JSON: {why}", code="invalid_json")
    if not loc:
        if kind == "missing":
            return APIError(400, "the request needs a JSON body")
        return APIError(400, f"the request body must be a JSON object: {first.get('msg', '')}")
    field = ".".join(loc)
    if kind == "missing":
        why = "this field is required"
    elif kind == "extra_forbidden":
        why = "unknown field"
    elif kind == "value_error":
        why = str((first.get("ctx") or {}).get("error", first.get("msg", "")))
    else:
        why = first.get("msg", "invalid value")
    return APIError(400, f"{field}: {why}", param=loc[0], code=None if kind != "missing" else "missing_field")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _log(request, exc)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(request, validation_error(exc))

    @app.exception_handler(PdlabError)
    async def _pdlab(request: Request, exc: PdlabError) -> JSONResponse:
        return await _api_error(request, invalid_request(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return await _api_error(request, APIError(exc.status_code, message, code=code))


def _log(request: Request, exc: APIError) -> None:
    where = f"{request.method} {request.url.path}"
    if exc.status >= 500:
        log.error("%s -> %d: %s", where, exc.status, exc.message)
    else:
        log.info("%s -> %d: %s", where, exc.status, exc.message)
