"""Every error the server answers, as JSON in OpenAI's shape, {"error": {"message", "type",
"param", "code"}}:

    400  a bad request, naming the offending field in `param` (engine.limits has the limits)
    401  a missing or wrong API key (--api-key)
    413  a body past --max-request-bytes
    500  a request that a device error failed, naming the cause (engine.Engine.recover)
    503  the engine's process is down, saying why (server.bridge restarts it)

A route raises ApiError (or lets InvalidRequest, EngineUnavailable, RequestFailed through) and
the handlers here answer it; the engine keeps serving.
"""

import re
import secrets

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.bridge import EngineUnavailable, RequestFailed


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error(status: int, message: str, param: str | None = None,
          kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(status, message, param, kind), status_code=status)


def engine_error_body(e: EngineUnavailable | RequestFailed) -> dict:
    """The error of a request the engine could not serve: also what a stream that already
    began with a 200 sends as its last event."""
    if isinstance(e, EngineUnavailable):
        return error_body(503, str(e), None, "service_unavailable")
    return error_body(500, str(e), None, "server_error")


# Pydantic names the member of a union a value failed in its error locations
# ("function-after[...]", "list[constrained-int]", "str"): the field is the rest.
_UNION_MEMBER = re.compile(r".*[\[\]-].*|str|int|float|bool|list|dict|none")


def field_name(loc) -> str | None:
    return ".".join(str(x) for x in loc
                    if x != "body" and not _UNION_MEMBER.fullmatch(str(x))) or None


def install(app: FastAPI, *, api_key: str | None, max_request_bytes: int) -> None:
    """The Guard middleware and a handler for every kind of error above."""
    app.add_middleware(Guard, api_key=api_key, max_bytes=max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        errors = exc.errors()
        # A value error says more than "not a list" from another member of a union.
        first = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON: {first.get('msg')}", None)
        param = field_name(first.get("loc", ()))
        message = ("this server does not know this field (server.protocol says which it "
                   "takes)" if first.get("type") == "extra_forbidden" else first.get("msg"))
        return error(400, f"{param or 'body'}: {message}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        # FastAPI's own 400 when a body cannot be read at all (e.g. it is not UTF-8).
        suffix = ": the body must be UTF-8 encoded JSON" if exc.status_code == 400 else ""
        return error(exc.status_code, f"{exc.detail}{suffix}", None)

    @app.exception_handler(ApiError)
    async def _api(_, exc: ApiError):
        return error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(EngineUnavailable)
    @app.exception_handler(RequestFailed)
    async def _engine(_, exc: Exception):
        body = engine_error_body(exc)
        return JSONResponse(body, status_code=body["error"]["code"])


class Guard:
    """ASGI middleware before every route: the API key (a `Authorization: Bearer <key>` header
    on every route but /health, as vLLM's --api-key asks) and the body size limit (413 past
    max_bytes, by Content-Length or, for a chunked body, as it arrives)."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.key = None if not api_key else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] != "/health" and not secrets.compare_digest(
                headers.get(b"authorization", b""), self.key):
            return await error(401, "a valid API key is required: send the header "
                               "'Authorization: Bearer <key>'", None,
                               "authentication_error")(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await error(413, f"the body has {length.decode(errors='replace')} bytes; at "
                               f"most {self.max_bytes} are accepted (--max-request-bytes)",
                               )(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"the body is larger than {self.max_bytes} bytes "
                                         "(--max-request-bytes)")
            return message
        return await self.app(scope, limited, send)
