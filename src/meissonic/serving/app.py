"""The FastAPI shell: both APIs over one `Engine`, with keys, a body-size cap, health checks and JSON errors.

- `/health` (alive) and `/ready` (model loaded; 503 before) need no key; everything else needs one of the keys as
  `Authorization: Bearer KEY` (HTTP Basic with the key as password also works, for AUTOMATIC1111 clients), compared
  in constant time. Without keys the server only listens on a loopback address (`serve` refuses otherwise).
- Errors are JSON in each API's shape (OpenAI's `{"error": {"message", "type", "param", "code"}}` under `/v1`,
  AUTOMATIC1111's `{"error", "detail", "errors"}` under `/sdapi`), never a traceback; a full queue answers 429 with
  `Retry-After`, a model still loading 503. Failures that a retry would only repeat carry `x-should-retry: false`
  (which the openai client honours).
- No CORS headers are sent (no wildcard): a browser page on another origin cannot call the server.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import a1111_api, openai_api
from .engine import Engine, JobError, NotReady, QueueFull

log = logging.getLogger("meissonic.serve")
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "server_error"}


class Unauthorized(Exception):
    pass


def key_matches(given: str, keys: list[str]) -> bool:
    """Whether `given` is one of `keys`, comparing with every key in constant time."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
    return None


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """An error in the shape of the API the path belongs to."""
    headers = dict(headers or {})
    if status != 429 and status != 503:
        headers["x-should-retry"] = "false"
    if request.url.path.startswith("/sdapi"):
        body = {"error": OPENAI_TYPES.get(status, "error"), "detail": message, "errors": message}
    else:
        body = {"error": {"message": message, "type": OPENAI_TYPES.get(status, "invalid_request_error"),
                          "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413, by its Content-Length or as it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(Request(scope), 413, f"the request body exceeds {self.limit} bytes")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def build_app(engine: Engine, keys: list[str] | None = None) -> FastAPI:
    """The app: `/health`, `/ready`, the OpenAI and AUTOMATIC1111 routes, all over `engine` (started by the
    caller). `keys`: the accepted API keys; none: no key asked (for loopback only)."""
    keys = list(keys or [])

    async def require_key(request: Request) -> None:
        if keys:
            given = presented_key(request)
            if given is None or not key_matches(given, keys):
                raise Unauthorized()

    app = FastAPI(title="meissonic serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(openai_api.router(engine), dependencies=[Depends(require_key)])
    app.include_router(a1111_api.router(engine), dependencies=[Depends(require_key)])

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if engine.ready:
            return {"status": "ready", "model": engine.model_name, "pid": os.getpid()}  # pid: which replica
        status = "failed" if engine.error else "loading"
        return JSONResponse({"status": status, "error": engine.error}, status_code=503)

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, err: Unauthorized):
        response = error_response(request, 401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                  code="invalid_api_key")
        response.headers["www-authenticate"] = "Bearer"
        return response

    @app.exception_handler(JobError)
    async def job_error(request: Request, err: JobError):
        return error_response(request, 400, str(err), err.param)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull):
        return error_response(request, 429, str(err), code="queue_full",
                              headers={"retry-after": str(err.retry_after)})

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, err: NotReady):
        return error_response(request, 503, str(err), code="not_ready", headers={"retry-after": "5"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = (err.errors() or [{}])[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return error_response(request, 400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return error_response(request, err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        log.error("meissonic serve: %s %s failed: %s: %s", request.method, request.url.path, type(err).__name__, err)
        return error_response(request, 500, "the server failed to make the images (see its log)")

    return BodyLimit(app, engine.limits.max_body_bytes) if engine.limits.max_body_bytes else app


# ---------------------------------------------------------------------------------------------- the command


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_keys(given: list[str] | None) -> list[str]:
    """The keys of `--api-key` (repeatable) and of MEISSONIC_API_KEY (several separated by commas)."""
    keys = [k for k in (given or []) if k]
    keys += [k.strip() for k in os.environ.get("MEISSONIC_API_KEY", "").split(",") if k.strip()]
    return list(dict.fromkeys(keys))


def load_for_serving(args):
    """The pipeline as `meissonic serve` runs it: loaded, prepared (precision, quantization, offload, compile), the
    size rule of the command line (large sizes refused unless --allow-large; memory checked)."""
    from ..cli_common import load_pipeline, prepare_pipeline, resolve_device, resolve_dtype
    from ..sizes import SizePolicy

    device = resolve_device(args.device)
    pipe = load_pipeline(args.model, resolve_dtype(args.dtype, device, args.model), args.allow_pickle)
    prepare_pipeline(pipe, device, args)
    pipe.set_progress_bar_config(disable=True)
    pipe.size_policy = SizePolicy(allow_large=args.allow_large, check_memory=not args.skip_memory_check,
                                  hint="start the server with --allow-large to allow it")
    return pipe


def make_engine(args, loader) -> Engine:
    from .engine import Limits

    limits = Limits(max_images=args.max_images, max_steps=args.max_steps, max_pixels=args.max_pixels,
                    max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    return Engine(loader, str(args.model), max_batch=args.max_batch, max_queue=args.max_queue, limits=limits,
                  default_speed=args.speed, describe={"dtype": args.dtype, "quantize": args.quantize})


def serve(app, engine: Engine, host: str, port: int) -> int:
    """Run uvicorn until stopped; if the model fails to load, stop with exit status 2."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_keep_alive=30))

    def watch_loading():
        engine.loaded.wait()
        if engine.error:
            server.should_exit = True

    threading.Thread(target=watch_loading, daemon=True).start()
    server.run()
    engine.close()
    return 2 if engine.error else 0
