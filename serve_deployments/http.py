"""What both ingress deployments (a model's and the server's) do with HTTP: JSON errors, bounded
body reading, and the V2 input tensor -> instances mapping."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayfoundry.errors import describe_validation_error
from serve_deployments.protocol import ApiError


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(doc, separators=(",", ":")).encode(), status, headers, media_type="application/json")


def error_response(exc: ApiError) -> Response:
    """{"error": "..."} with the error's status; 503s carry Retry-After."""
    return json_response({"error": exc.message}, exc.status, {"retry-after": "1"} if exc.status == 503 else None)


def json_errors(api: FastAPI) -> FastAPI:
    """Every error `api` answers is {"error": "..."}; 503s carry Retry-After."""

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": describe_validation_error(exc.errors())}, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        """Anything else (a model replica gone mid-call, a bug): a JSON 500 naming only its type."""
        logging.getLogger("ray.serve").exception("%s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}; retry shortly"))

    return api


class BodyReader:
    """Reads whole request bodies within max_body_bytes (413) and body_timeout_s (408); at most
    max_bodies_in_flight bodies are read at once (503), so slow clients cannot hold every slot."""

    def __init__(self, max_body_bytes: int, body_timeout_s: float, max_bodies_in_flight: int):
        self.limit, self.timeout_s, self.max_in_flight = max_body_bytes, body_timeout_s, max_bodies_in_flight
        self.in_flight = 0

    async def read(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and re.fullmatch(r"[0-9]{1,19}", declared) and int(declared) > self.limit:
            raise ApiError(413, f"request body of {declared} bytes; the limit is {self.limit}")
        if self.in_flight >= self.max_in_flight:
            raise ApiError(503, f"{self.in_flight} request bodies are being received; retry shortly")
        self.in_flight += 1
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > self.limit:
                    raise ApiError(413, f"request body over the limit of {self.limit} bytes")

        try:
            await asyncio.wait_for(read(), self.timeout_s)
        except TimeoutError:
            raise ApiError(408, f"request body not received within {self.timeout_s:g}s ({len(body)} bytes arrived)") from None
        finally:
            self.in_flight -= 1
        return bytes(body)


def v2_instances(model: str, kind: str, num_features: int | None, tensors: dict[str, np.ndarray]) -> Any:
    """The instances a V2 request's input tensor holds: texts, or float32 rows of num_features."""
    want = "text" if kind == "text" else "features"
    if want not in tensors and len(tensors) != 1:
        raise ApiError(422, f"inputs: expected one input named {want!r}, got {', '.join(tensors)}")
    name, value = (want, tensors[want]) if want in tensors else next(iter(tensors.items()))
    if value.ndim == 0 or value.shape[0] == 0:
        raise ApiError(422, f"inputs.{name}: shape {list(value.shape)}; the first dimension is the batch (>= 1)")
    if kind == "text":
        if value.dtype != object:
            raise ApiError(422, f"inputs.{name}.datatype: {model} takes BYTES (text)")
        if value.ndim > 2 or (value.ndim == 2 and value.shape[1] != 1):
            raise ApiError(422, f"inputs.{name}: shape {list(value.shape)}; expected [N] or [N, 1] texts")
        return [str(v) for v in value.reshape(-1)]
    if value.dtype == object:
        raise ApiError(422, f"inputs.{name}.datatype: {model} takes FP32 (numbers), not BYTES")
    per_row = int(np.prod(value.shape[1:])) if value.ndim > 1 else 0
    if per_row != num_features:
        raise ApiError(422, f"inputs.{name}: shape {list(value.shape)}; expected [N, {num_features}]"
                            + (" or [N, 8, 8]" if kind == "image" else ""))
    return value.reshape(len(value), -1).astype(np.float32)
