"""schemathesis against the app's own OpenAPI schema, in process (ASGI), time-boxed.

Every operation of the served schema gets a bounded number of generated requests, valid
ones and invalid ones. Checks: no 5xx, every status is documented, responses match their
schemas and content types, and invalid requests are refused (4xx). Decoding stays cheap
with the tiny model and a small CHATBOT_MAX_INPUT_CHARS (the served schema's maxLength).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from model.checkpoint import Checkpoint
from tests.api.conftest import make_engine, make_settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]
EXAMPLES = 40  # per operation and mode: a few seconds for the whole schema on a quiet machine


@pytest.fixture
def api_schema(tiny_checkpoint: Path, ckpt: Checkpoint) -> Iterator[schemathesis.BaseSchema]:
    served = make_settings(tiny_checkpoint, max_input_chars=200, request_timeout_s=120.0)
    app = create_app(served, engine=make_engine(ckpt, served))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()  # stops the engine the first request started (an engine does not restart)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_honours_its_own_schema(api_schema: schemathesis.BaseSchema, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /api/chat", "POST /v1/chat/completions", "GET /v1/models", "GET /ready"} <= labels
    failures: dict[str, str] = {}
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate, Phase.shrink],
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS)

        try:
            check()
        except Unsatisfiable:  # no invalid request exists for it (no body, no constrained parameter)
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # collect every operation's failure, then report them all
            failures[operation.label] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
