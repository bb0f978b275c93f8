"""The FastAPI app: OpenAI's completions, chat and models routes, health and metrics, one engine
behind them all."""

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..engine import Engine
from ..errors import KvgenError
from ..llm import LLM
from .chat import create_chat_completion
from .chat_template import find_chat_template
from .completions import create_completion
from .engine_loop import EngineLoop
from .errors import ApiError, error_response, install_error_handlers
from .metrics import Metrics
from .state import ServerState

DEFAULT_MAX_BODY_BYTES = 4 * 2**20  # generous for text: a 128k-token prompt is about 500 kB


def create_app(llm: LLM, *, engine: Engine | None = None, model_name: str | None = None,
               api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               **engine_options) -> FastAPI:
    """Return the app serving llm through engine (by default Engine(llm, **engine_options)).

    The engine's thread starts and stops with the app's lifespan. model_name defaults to the
    model folder's name; with api_key, /v1 routes need "Authorization: Bearer <api_key>".
    """
    if llm.tokenizer is None:
        raise KvgenError("the server speaks text, and this model was loaded without a "
                         "tokenizer (pass tokenizer= to kvgen.load or --tokenizer)")
    if not isinstance(max_body_bytes, int) or max_body_bytes <= 0:
        raise KvgenError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    engine_loop = EngineLoop(engine if engine is not None else Engine(llm, **engine_options))
    state = ServerState(llm=llm, engine_loop=engine_loop, metrics=Metrics(engine_loop),
                        model_name=model_name or default_model_name(llm.source),
                        chat_template=find_chat_template(llm.source), api_key=api_key or None,
                        max_body_bytes=max_body_bytes, created=int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine_loop.stop)

    # No /docs: the routes read their bodies by hand, so FastAPI's schema would be empty.
    app = FastAPI(title="kvgen", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.kvgen = state
    install_error_handlers(app)
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_check_api_key)])
    v1.add_api_route("/completions", create_completion, methods=["POST"])
    v1.add_api_route("/chat/completions", create_chat_completion, methods=["POST"])
    v1.add_api_route("/models", _models, methods=["GET"])
    v1.add_api_route("/models/{model_id:path}", _model, methods=["GET"])
    app.include_router(v1)
    return app


def default_model_name(source: Path) -> str:
    """Return the name a model is served under: its folder's name, or a checkpoint file's name
    without its extension."""
    return source.name if source.is_dir() else source.stem


async def _check_api_key(request: Request):
    key = request.app.state.kvgen.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                             key.encode()):
        raise ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer "
                       "<key>'", code="invalid_api_key")


async def _health(request: Request) -> Response:
    if not request.app.state.kvgen.engine_loop.alive:
        return error_response(503, "the engine is not running", code="engine_unavailable")
    return JSONResponse({"status": "ok"})


async def _metrics(request: Request) -> Response:
    content, content_type = request.app.state.kvgen.metrics.render()
    return Response(content, media_type=content_type)


async def _models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [request.app.state.kvgen.model_card()]})


async def _model(request: Request, model_id: str) -> Response:
    state = request.app.state.kvgen
    state.check_model(model_id)
    return JSONResponse(state.model_card())
