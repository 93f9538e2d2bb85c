"""The OpenAPI document and its two viewers, behind the same API keys as everything else.

FastAPI's built-in ``/docs``, ``/redoc`` and ``/openapi.json`` are switched off (``docs_url=None``
and friends) and re-added here as ordinary routes, so the gate (:mod:`gate`) asks for a key as it
does for every endpoint. With auth on, fetch the document with a key (``curl -H "Authorization:
Bearer ..." .../openapi.json``); a browser cannot send one, so the viewers then answer 401.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

OPENAPI_PATH = "/openapi.json"


def register_docs(api: FastAPI) -> None:
    """Add ``/openapi.json``, ``/docs`` and ``/redoc`` to ``api`` (built with ``openapi_url=None``)."""

    def document_url(request: Request) -> str:
        return request.scope.get("root_path", "") + OPENAPI_PATH

    # ``request.app``, not ``api``: Serve serves a frozen copy of the app with its class-based
    # endpoints bound to the ingress; that copy's routes are the ones to document.
    @api.get(OPENAPI_PATH, include_in_schema=False)
    async def openapi_document(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @api.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=document_url(request), title=f"{request.app.title} - docs")

    @api.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=document_url(request), title=f"{request.app.title} - ReDoc")
