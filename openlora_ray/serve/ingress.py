"""OpenAI-compatible HTTP API (FastAPI inside Serve) and adapter management.

(No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at
runtime to tell request bodies from query parameters.)

``model`` names the adapter (``name`` or ``name@version``); the served base model's name means no
adapter. The ingress pins ``name`` to its newest version, so every replica and the router key
slots by an immutable id, then hands the request to the replica deployment with the pinned id as
Serve's multiplexed model id, which the adapter-affinity router reads.
"""


import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import context as serve_context
from ray.serve._private.utils import generate_request_id
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from openlora_ray.errors import AdapterNotFoundError, InvalidRequestError, PermissionDeniedError, StoreUnavailableError
from openlora_ray.serve.auth import KeyRing, Principal
from openlora_ray.serve.limits import KeyLimiter
from openlora_ray.serve.config import AppConfig
from openlora_ray.serve.docs import register_docs
from openlora_ray.serve.errors import error_response, stream_error
from openlora_ray.serve.gate import configure as configure_gate
from openlora_ray.serve.gate import gate
from openlora_ray.serve.labels import Labelled, ModelLabels
from openlora_ray.serve.openai_api import (
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from openlora_ray.serve.openai_responses import completion_response, error_body, model_card, total_usage
from openlora_ray.serve.openai_serving import chunk_writer, results, start_choices
from openlora_ray.serve.state import ReplicaState
from openlora_ray.serve.tool_calls import shape_piece, shape_whole
from openlora_ray.store.listing import MAX_PAGE, Page
from openlora_ray.store.store import AdapterStore

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-openlora-replica"
Generation = CompletionRequest | ChatCompletionRequest
DEFAULT_MAX_TOKENS = 256

api = FastAPI(title="openlora-ray", description="OpenAI-compatible multi-LoRA serving", docs_url=None, redoc_url=None, openapi_url=None)
api.middleware("http")(gate)  # every request: an API key (but /healthz, /health), a sane body
register_docs(api)  # /openapi.json, /docs and /redoc behind the gate


@api.exception_handler(RequestValidationError)
async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """400 with OpenAI's body; ``param`` names the field (an unsupported one gets its own code)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    param = (first.get("ctx") or {}).get("param") or where or None
    code = first["type"] if first["type"] in ("unsupported_parameter", "invalid_value") else "invalid_request"
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return JSONResponse(error_body(message, "invalid_request_error", code, param), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods answer OpenAI's error body, not FastAPI's ``detail``."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    body = error_body(str(exc.detail), "invalid_request_error", codes.get(exc.status_code, str(exc.status_code)))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _unchanged(item: dict[str, Any]) -> dict[str, Any]:
    return item


def _residency(aid: str, states: list[ReplicaState]) -> dict[str, list[str]]:
    return {
        "resident_on": [s.replica_id for s in states if aid in s.resident],
        "host_on": [s.replica_id for s in states if aid in s.host],
        "disk_on": [s.replica_id for s in states if aid in s.disk],
    }


@contextlib.contextmanager
def _own_serve_request_id() -> Iterator[None]:
    """A handle call made in here gets an internal request id of its own.

    Serve 2.60 gives a handle call the internal id of the request being served, and its request
    router keeps one pending request per internal id: the second and later of several calls made
    for one HTTP request (the choices of ``n`` > 1) were never routed and hung. Our router also
    keys its claims and in-flight counts by that id. Serve's cancelling of child calls when the
    HTTP request is cancelled goes by that id too, so ``openai_serving`` cancels them itself.
    """
    ctx = serve_context._get_serve_request_context()
    own = dataclasses.replace(ctx, _internal_request_id=generate_request_id())
    token = serve_context._serve_request_context.set(own)
    try:
        yield
    finally:
        serve_context._serve_request_context.reset(token)


class PrefetchBody(BaseModel):
    replicas: int = Field(1, ge=1, description="how many replicas should hold the adapter")


@serve.ingress(api)
class Ingress:
    def __init__(self, replicas: DeploymentHandle, config: dict[str, Any]) -> None:
        self.cfg = AppConfig.model_validate(config)
        self.replicas = replicas
        self.store = AdapterStore(self.cfg.store) if self.cfg.store is not None else None
        self.keys = KeyRing(self.cfg.auth)
        self.limiter = KeyLimiter(self.cfg.limits)
        # name -> the version a bare name last resolved to: used only while the store is down.
        self._last_pins: dict[str, str] = {}
        self._stale: set[str] = set()  # names served from _last_pins since the store last answered
        configure_gate(self.cfg.auth, self.cfg.limits.max_body_bytes)
        if not self.cfg.auth.enabled:
            log.warning("AUTHENTICATION IS DISABLED: anyone who reaches this port can use and manage every adapter")
        tags = ("model",)
        self._m_requests = Counter("openlora_requests", "HTTP generation requests by adapter and status", tag_keys=("model", "status"))
        self._m_tokens = Counter("openlora_tokens", "tokens by adapter and kind (prompt, completion)", tag_keys=("model", "kind"))
        self._m_ttft = Histogram("openlora_time_to_first_token_seconds", "engine time to first token", boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30], tag_keys=tags)
        self._m_tpot = Histogram("openlora_time_per_output_token_seconds", "mean time between output tokens", boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1], tag_keys=tags)
        self._labels = ModelLabels(self.cfg.served_model_name)  # bounded "model" label values
        self._m_requests, self._m_tokens, self._m_ttft, self._m_tpot = (Labelled(m, self._labels) for m in (self._m_requests, self._m_tokens, self._m_ttft, self._m_tpot))

    # ------------------------------------------------------------------ OpenAI endpoints
    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, authorization: str | None = Header(None)) -> Any:
        return await self._serve(authorization, body, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, authorization: str | None = Header(None)) -> Any:
        return await self._serve(authorization, body, chat=True)

    @api.get("/v1/models")
    async def models(self, after: str | None = None, limit: int = Query(MAX_PAGE, ge=1, le=MAX_PAGE), authorization: str | None = Header(None)) -> Any:
        """The base model, then the adapters this key may use, a page at a time in the store's
        key order (``after`` = the previous page's ``last_id``; ``has_more`` says whether to go on)."""
        now = int(time.time())
        page = Page((), has_more=False)
        data = [model_card(self.cfg.served_model_name, now)]
        if self.store is not None:
            try:
                principal = self.keys.authenticate(authorization)
                owners = principal.owners(self.cfg.auth.shared_owner)  # other tenants' adapters are skipped unread
                page = await asyncio.to_thread(self.store.page, after, limit, lambda name: self._visible(principal, name), owners)
            except Exception as e:  # noqa: BLE001 - mapped to an HTTP answer, never swallowed
                return self._error(e)
            data += [model_card(a.name, now, parent=self.cfg.served_model_name) for a in page.adapters]
        data = data[1:] if after else data  # the base model heads the first page only
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None, "last_id": page.last, "has_more": page.has_more}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, authorization: str | None = Header(None)) -> Any:
        """The base model or an adapter this key may use (another tenant's reads as not found)."""
        try:
            adapter = await self._resolve_model(model_id, self.keys.authenticate(authorization))
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        parent = None if adapter is None else self.cfg.served_model_name
        return model_card(model_id, int(time.time()), parent=parent)

    @api.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest, authorization: str | None = Header(None)) -> Any:
        """vLLM's /tokenize. Adapters share the base model's tokenizer and chat template, so any
        replica answers, whatever adapter ``model`` names (checked like a generation request)."""
        try:
            await self._resolve_model(body.model, self.keys.authenticate(authorization))
            handle = self.replicas.options(method_name="tokenize")
            out = await handle.remote(body.to_prompt(), body.return_token_strs)
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        return {"count": len(out["tokens"]), **out}

    @api.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest, authorization: str | None = Header(None)) -> Any:
        try:
            await self._resolve_model(body.model, self.keys.authenticate(authorization))
            text = await self.replicas.options(method_name="detokenize").remote(body.tokens)
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        return {"prompt": text}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """vLLM's name for the same check (guidellm and others probe it before sending load)."""
        return {"status": "ok"}

    # -------------------------------------------------------------- adapter management
    @api.get("/v1/adapters")
    async def list_adapters(self, after: str | None = None, limit: int = Query(MAX_PAGE, ge=1, le=MAX_PAGE), authorization: str | None = Header(None)) -> Any:
        """Every version of up to ``limit`` adapters after ``after`` (paged as ``/v1/models``)."""
        try:
            principal = self.keys.authenticate(authorization)
            keep, owners = (lambda name: self._visible(principal, name)), principal.owners(self.cfg.auth.shared_owner)
            page = await asyncio.to_thread(self.store.page, after, limit, keep, owners) if self.store else Page((), has_more=False)
            states = await self._replica_states()
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        visible = [v for a in page.adapters for v in a.versions]
        data = [{"id": str(v.id), "size": v.size, "pushed_at": v.pushed_at.isoformat(), **_residency(str(v.id), states)} for v in visible]
        return {"data": data, "last_id": page.last, "has_more": page.has_more}

    @api.get("/v1/replicas")
    async def list_replicas(self, authorization: str | None = Header(None)) -> Any:
        """Each model replica's state as the routers see it: free slots and memory, load, and the
        adapters it holds. Admin only; another tenant's adapters are left out of the lists."""
        try:
            principal = self.keys.authenticate(authorization)
            if not principal.admin:
                raise PermissionDeniedError("the replica view needs an admin key")
            described = await self._describe_replicas()
        except Exception as e:  # noqa: BLE001
            return self._error(e)

        def visible(ids: list[str]) -> list[str]:
            return [aid for aid in ids if self._visible(principal, aid.split("@", 1)[0])]

        lists = ("resident", "host", "disk", "loading", "pinned")
        return {
            "data": [
                {**d, **{k: visible(d[k]) for k in lists}, "prefix": {a: v for a, v in d["prefix"].items() if not a or visible([a])}}
                for d in sorted(described, key=lambda d: d["replica_id"])
            ]
        }

    @api.get("/v1/adapters/{adapter}")
    async def inspect_adapter(self, adapter: str, authorization: str | None = Header(None)) -> Any:
        try:
            aid = await self._pin(adapter, self.keys.authenticate(authorization))
            manifest, config = await asyncio.gather(asyncio.to_thread(self.store.stat, aid), asyncio.to_thread(self.store.read_config, aid))
            states = await self._replica_states()
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        files = {name: {"size": f.size, "sha256": f.sha256} for name, f in manifest.files.items()}
        return {"id": aid, "files": files, "config": json.loads(config), **_residency(aid, states)}

    @api.post("/v1/adapters/{adapter}/prefetch")
    async def prefetch(self, adapter: str, body: PrefetchBody | None = None, authorization: str | None = Header(None)) -> Any:
        return await self._place(authorization, adapter, (body or PrefetchBody()).replicas, pin=False)

    @api.post("/v1/adapters/{adapter}/pin")
    async def pin(self, adapter: str, body: PrefetchBody | None = None, authorization: str | None = Header(None)) -> Any:
        return await self._place(authorization, adapter, (body or PrefetchBody()).replicas, pin=True)

    @api.post("/v1/adapters/{adapter}/unpin")
    async def unpin(self, adapter: str, authorization: str | None = Header(None)) -> Any:
        return await self._on_holders(authorization, adapter, "unpin", lambda s, aid: aid in s.resident)

    @api.post("/v1/adapters/{adapter}/evict")
    async def evict(self, adapter: str, authorization: str | None = Header(None)) -> Any:
        return await self._on_holders(authorization, adapter, "evict", lambda s, aid: aid in s.resident or aid in s.host)

    # ------------------------------------------------------------------------ internals
    async def _serve(self, authorization: str | None, body: Generation, chat: bool) -> Any:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            principal = self.keys.authenticate(authorization)
            choices = body.choices(min(DEFAULT_MAX_TOKENS, self.cfg.limits.max_tokens))
            self._check_limits(choices[0].params, body.prompt_chars())
            self._admit(principal, len(choices))
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        try:
            response = await self._generate(principal, body, rid, choices, chat)
        except BaseException:
            self._release(principal, len(choices))
            raise
        if isinstance(response, StreamingResponse):
            return response  # the stream releases the key's slots when it ends
        self._release(principal, len(choices))
        return response

    def _admit(self, principal: Principal, choices: int) -> None:
        """Per-key limits apply with auth on; the in-flight cap counts engine requests (``n`` x
        prompts), the rate counts HTTP requests. With auth off every caller shares one anonymous
        key, so a per-key cap would throttle all local users together: their requests queue in
        Serve instead (ingress and replica ``max_ongoing_requests``/``max_queued_requests``)."""
        if self.cfg.auth.enabled:
            self.limiter.admit(principal.key_id, choices=choices)

    def _release(self, principal: Principal, choices: int) -> None:
        if self.cfg.auth.enabled:
            self.limiter.done(principal.key_id, choices)

    async def _generate(
        self, principal: Principal, body: Generation, rid: str, choices: list[Choice], chat: bool
    ) -> Any:
        model = body.model
        try:
            adapter = await self._resolve_model(model, principal)
            handle = self.replicas.options(method_name="generate", stream=True, multiplexed_model_id=adapter or "")

            def start(c: Choice) -> Any:
                request_id = rid if len(choices) == 1 else f"{rid}-{c.index}"
                with _own_serve_request_id():
                    return handle.remote({
                        "prompt": c.prompt,
                        "params": c.params.model_dump(exclude_unset=True),  # unset: the model's defaults
                        "request_id": request_id,
                        "fit_max_tokens": body.max_tokens_omitted,
                        "echo": body.echoes_prompt,
                        "prompt_logprobs": body.prompt_logprobs,  # answered in vLLM's shape
                    })

            running = await start_choices(choices, start)  # errors before the first token become statuses
        except Exception as e:  # noqa: BLE001
            self._m_requests.inc(tags={"model": model, "status": "error"})
            return self._error(e)
        headers = {REPLICA_HEADER: running.replica}
        parsers = [body.call_parser(self.cfg.tool_call_parser) if chat else None for _ in choices]
        if body.stream:
            events = running.events(
                chunk_writer(rid, model, chat),
                body.include_usage,
                on_done=lambda lasts: self._record(model, lasts),
                on_error=lambda e: self._stream_error(model, e),
                shape=[functools.partial(shape_piece, p) if p else _unchanged for p in parsers],
            )
            return StreamingResponse(self._released(events, principal, len(choices)), media_type="text/event-stream", headers=headers)
        try:
            lasts = await running.collect()
        except Exception as e:  # noqa: BLE001
            self._m_requests.inc(tags={"model": model, "status": "error"})
            return self._error(e)
        self._record(model, lasts)
        lasts = [shape_whole(p, last) if p else last for p, last in zip(parsers, lasts, strict=True)]
        every = results(choices, lasts)  # best_of's candidates all count in the usage
        answer = completion_response(rid, model, body.pick(every), chat, total_usage(every))
        return JSONResponse(answer, headers=headers)

    async def _released(
        self, events: AsyncGenerator[str, None], principal: Principal, choices: int
    ) -> AsyncIterator[str]:
        """The events, then the key's slots back; closing early (a client gone) cancels the choices."""
        try:
            async for event in events:
                yield event
        finally:
            try:
                await events.aclose()
            finally:
                self._release(principal, choices)

    def _stream_error(self, model: str, exc: BaseException) -> dict[str, Any]:
        """The error event that ends a stream which already answered 200."""
        self._m_requests.inc(tags={"model": model, "status": "error"})
        return stream_error(exc)

    def _record(self, model: str, lasts: list[dict[str, Any]]) -> None:
        self._m_requests.inc(tags={"model": model, "status": "ok"})
        for last in lasts:
            self._m_tokens.inc(max(1, last["prompt_tokens"]), tags={"model": model, "kind": "prompt"})
            if last["completion_tokens"]:
                self._m_tokens.inc(last["completion_tokens"], tags={"model": model, "kind": "completion"})
            if last["ttft_s"] is not None:
                self._m_ttft.observe(last["ttft_s"], tags={"model": model})
            if last["tpot_s"] is not None:
                self._m_tpot.observe(last["tpot_s"], tags={"model": model})

    def _check_limits(self, params: Any, prompt_chars: int) -> None:
        lim = self.cfg.limits
        if params.max_tokens > lim.max_tokens:
            raise InvalidRequestError(f"max_tokens {params.max_tokens} is above this server's limit of {lim.max_tokens}")
        if len(params.stop) > lim.max_stop:
            raise InvalidRequestError(f"at most {lim.max_stop} stop sequences are allowed")
        if prompt_chars > lim.max_prompt_chars:
            raise InvalidRequestError(f"the prompt is longer than this server's limit of {lim.max_prompt_chars} characters")

    async def _resolve_model(self, model: str | None, principal: Principal) -> str | None:
        """None for the base model (also when ``model`` is left out), else the adapter's pinned id."""
        if model is None or model == self.cfg.served_model_name:
            return None
        return await self._pin(model, principal)

    def _visible(self, principal: Principal, name: str) -> bool:
        return principal.may_use(name, self.cfg.auth.shared_owner)

    async def _pin(self, model: str, principal: Principal, admin: bool = False) -> str:
        """The pinned id of an adapter this key may use (someone else's reads as not found)."""
        if self.store is None:
            raise AdapterNotFoundError(model, "this deployment (no adapter store configured)")
        name = model.split("@", 1)[0]
        if not self._visible(principal, name):
            raise AdapterNotFoundError(model)
        if admin:
            principal.check_may_manage(name, self.cfg.auth.shared_owner)
        try:
            pinned = str(await asyncio.to_thread(self.store.pin, model))
        except StoreUnavailableError:
            # A bare name needs a listing of the store. While the store is unreachable, serve the
            # version this name last resolved to (replicas hold it in their caches) rather than
            # refusing adapters that need no download; uncached ones still fail in the replica.
            last = self._last_pins.get(model)
            if last is None:
                raise
            if model not in self._stale:  # once per name and outage, not once per request
                self._stale.add(model)
                log.warning("store unreachable: serving %r as %s, the version it last resolved to", model, last)
            return last
        self._labels.admit(model)
        if "@" not in model:
            self._last_pins[model] = pinned
            self._stale.discard(model)
        return pinned

    async def _describe_replicas(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(lambda: self.replicas.broadcast("describe").results())

    async def _replica_states(self) -> list[ReplicaState]:
        return [ReplicaState.from_stats(d["replica_id"], d) for d in await self._describe_replicas()]

    async def _place(self, authorization: str | None, adapter: str, n: int, pin: bool) -> Any:
        """Load (and pin) an adapter on ``n`` replicas: current holders first, then most free memory."""
        try:
            aid = await self._pin(adapter, self.keys.authenticate(authorization), admin=True)
            states = await self._replica_states()
            ranked = sorted(states, key=lambda s: (aid not in s.resident, not s.holds(aid), -s.free_vram_mb, s.load))
            targets = [s.replica_id for s in ranked[:n]]
            done = await asyncio.to_thread(lambda: self.replicas.broadcast("prefetch", aid, targets, pin).results())
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        return {"id": aid, "replicas": [r for r in done if r is not None], "pinned": pin}

    async def _on_holders(self, authorization: str | None, adapter: str, method: str, holds) -> Any:
        try:
            aid = await self._pin(adapter, self.keys.authenticate(authorization), admin=True)
            states = await self._replica_states()
            targets = [s.replica_id for s in states if holds(s, aid)]
            if not targets:
                raise AdapterNotFoundError(aid, "any replica's slots or host tier")
            await asyncio.to_thread(lambda: self.replicas.broadcast(method, aid, targets).results())
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        return {"id": aid, "replicas": targets}

    @staticmethod
    def _error(exc: BaseException) -> JSONResponse:
        response = error_response(exc)
        if response is None:
            raise exc
        return response

