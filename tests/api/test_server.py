"""Settings from the environment and `chatbot serve`: fast failures, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.server import serve
from app.settings import Settings


def test_settings_come_from_chatbot_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHATBOT_MAX_QUEUE", "7")
    monkeypatch.setenv("CHATBOT_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("CHATBOT_API_KEY", "tops3cretkey")
    monkeypatch.setenv("CHATBOT_PORT", "9001")
    s = Settings(port=9002)  # a flag wins over the variable
    assert s.max_queue == 7 and s.port == 9002
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.api_key is not None and s.api_key.get_secret_value() == "tops3cretkey"
    assert "tops3cretkey" not in repr(s) + str(s)  # the key is masked
    monkeypatch.setenv("CHATBOT_API_KEY", "")
    monkeypatch.delenv("CHATBOT_MAX_QUEUE")
    assert Settings().api_key is None
    assert Settings().max_queue >= 100  # the default queue holds ordinary bursts


def test_serve_fails_at_once_on_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere"
    assert serve(checkpoint=missing, host="127.0.0.1", port=0) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such checkpoint directory" in err


def test_serve_fails_at_once_on_a_broken_checkpoint(tmp_path: Path, tiny_checkpoint: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x80\x04garbage")
    assert serve(checkpoint=broken, host=None, port=None) == 2
    err = capsys.readouterr().err
    assert str(broken / "model.safetensors") in err


def test_serve_refuses_bad_settings(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("CHATBOT_MAX_QUEUE", "lots")
    assert serve(checkpoint=tiny_checkpoint, host=None, port=None) == 2
    assert "CHATBOT_MAX_QUEUE" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_chatbot_serve_answers_then_stops_cleanly_on_sigterm(tiny_checkpoint: Path) -> None:
    port = _free_port()
    env = {**os.environ, "CHATBOT_NUM_THREADS": "1", "CHATBOT_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--checkpoint", str(tiny_checkpoint),
                             "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        r = httpx.post(f"{url}/api/chat", json={"message": "hello"}, timeout=10)
        assert r.status_code == 200 and r.json()["reply"]
        proc.send_signal(signal.SIGTERM)
        # a graceful stop is a success: exit 0, not death by the signal uvicorn caught
        assert proc.wait(timeout=30) == 0
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "Traceback" not in output and "ERROR" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_http_process_never_imports_torch() -> None:
    """`chatbot serve`'s HTTP side (app, routes, the remote engine, the CLI) reads the checkpoint's
    config and tokenizer only; the weights and torch live in the model worker."""
    code = ("import sys, app.cli, app.main, app.server, app.factory, app.remote_engine; "
            "from app.factory import build_engine; from app.settings import Settings; "
            "engine = build_engine(Settings()); assert engine.name and engine.encode_turns(['hi']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CHATBOT_MODEL_PROCESS": "true"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_model_worker_never_imports_the_http_settings() -> None:
    """The worker is told a ModelSpec, not the HTTP settings: pydantic, pydantic-settings and
    FastAPI stay out of its memory (about 9 MiB of it)."""
    code = ("import sys, app.model_worker; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'pydantic_settings', "
            "'fastapi', 'uvicorn'}) + sorted({'app.settings', 'app.schemas'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_serve_refuses_bf16_on_a_cpu_without_it_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                           tiny_checkpoint: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    import model.fastpath

    monkeypatch.setattr(model.fastpath, "cpu_bf16_native", lambda: False)  # as on an AVX2-only CPU
    monkeypatch.setenv("CHATBOT_MODEL_PROCESS", "false")
    monkeypatch.setenv("CHATBOT_QUANTIZE", "bf16")
    assert serve(checkpoint=tiny_checkpoint, host=None, port=None) == 2
    err = capsys.readouterr().err
    assert "native bf16" in err and "Traceback" not in err
