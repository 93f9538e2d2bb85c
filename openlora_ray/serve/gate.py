"""What every HTTP request passes before an endpoint sees it: an API key, and a well-formed body
no larger than the limit.

One middleware for the whole app, so no endpoint can forget authentication (the OpenAPI document
and the docs pages included; only the liveness probes are open) and no malformed framing reaches
a handler: a ``Content-Length`` that is not a number is a 400, one above ``max_body_bytes`` a 413
before the body is read, and a body without one is counted while it streams in. Endpoints still
authenticate to learn the caller's tenant; this layer only refuses callers without a valid key.

Serve rebuilds the FastAPI app from a frozen copy in the ingress replica, so the settings cannot
travel on ``api.state``: :func:`configure`, called from the ingress's constructor, puts them in
that replica's process environment, where the middleware reads them. A replica whose gate was
never configured answers 503 rather than serve unauthenticated.
"""

from __future__ import annotations

import os
from functools import lru_cache

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from openlora_ray.errors import AuthenticationError
from openlora_ray.serve.auth import AuthSettings, KeyRing
from openlora_ray.serve.errors import error_response, refusal

GATE_ENV = "OPENLORA_GATE"
# Liveness probes (Kubernetes, load balancers, benchmark tools) carry no key and reveal nothing.
OPEN_PATHS = frozenset({"/healthz", "/health"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class GateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    auth: AuthSettings
    max_body_bytes: int


def configure(auth: AuthSettings, max_body_bytes: int) -> None:
    """Arm the gate of this process's app (the ingress replica's constructor calls it)."""
    os.environ[GATE_ENV] = GateSettings(auth=auth, max_body_bytes=max_body_bytes).model_dump_json()


@lru_cache(maxsize=4)
def _armed(raw: str) -> tuple[KeyRing, int]:
    settings = GateSettings.model_validate_json(raw)
    return KeyRing(settings.auth), settings.max_body_bytes


def route_path(request: Request) -> str:
    """The path below the app's route prefix (``/secure/healthz`` -> ``/healthz``)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


async def gate(request: Request, call_next):
    raw = os.environ.get(GATE_ENV)
    if raw is None:
        return JSONResponse({"error": {"message": "the server is starting", "type": "server_error"}}, status_code=503)
    keys, limit = _armed(raw)
    if keys.enabled and route_path(request) not in OPEN_PATHS:
        try:
            keys.authenticate(request.headers.get("authorization"))
        except AuthenticationError as e:
            return error_response(e)
    if request.method in _BODY_METHODS:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                return refusal(f"Content-Length must be a number of bytes, got {declared[:40]!r}", "invalid_content_length", 400)
            if int(declared) > limit:
                return _too_large(limit)
        else:
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    return _too_large(limit)
            request._body = body  # starlette re-reads the buffered body from here
    return await call_next(request)


def _too_large(limit: int) -> JSONResponse:
    return refusal(f"request body exceeds {limit} bytes", "body_too_large", 413)
