"""Service endpoints: /health and /ready (open), /metrics, /api/model."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..error_responses import error_responses
from ..errors import NotReady
from ..schemas import Health, ModelInfo, Ready
from .common import EngineDep

router = APIRouter(tags=["service"])
protected = APIRouter(tags=["service"])  # behind the API key when one is set


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The process is alive (it may still be loading the model)."""
    return Health()


@router.get("/ready", response_model=Ready, responses=error_responses(503))
async def ready(engine: EngineDep) -> Ready:
    """A model is loaded and the engine serves; 503 otherwise (also while a model worker
    restarts: requests sent meanwhile wait for it, but a load balancer should send them
    elsewhere)."""
    if not engine.ready:
        raise NotReady("the model process is restarting", headers={"Retry-After": "1"})
    return Ready(model=engine.name)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format",
                             "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by route and status, latency histograms, queue
    depth, batch sizes, tokens generated."""
    body = generate_latest(request.app.state.metrics.registry)
    engine = getattr(request.app.state, "engine", None)
    if engine is not None:  # the model worker process's families
        body += await engine.exposition()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@protected.get("/api/model", response_model=ModelInfo, responses=error_responses(503))
async def model_info(engine: EngineDep) -> ModelInfo:
    """What is loaded: name, parameters, vocabulary, architecture, training metrics."""
    return ModelInfo(**engine.info())
