"""A real OpenAI-compatible server for tests: `transformers serve` (transformers' `serving` extra) on 127.0.0.1.

`transformers_serve(model_dir, log_path)` starts it on a free port in a process group of its own, serving the model
folder offline, waits until /v1/models answers, yields the base URL (``http://127.0.0.1:PORT/v1``) and, on exit,
kills the whole process group and waits for it, so nothing listens after the test. The server's output, uvicorn's
access log included (``"POST /v1/chat/completions HTTP/1.1" 200``), goes to `log_path`: `requests_in_log` counts
the requests the server received.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STARTUP_TIMEOUT_S = 180  # loading the model and importing torch on two busy cores


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200 and "data" in json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return False


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def transformers_serve(model_dir: Path, log_path: Path) -> Iterator[str]:
    """`transformers serve MODEL_DIR` on a free local port; yields its base URL, ending in /v1."""
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "from transformers.cli.transformers import main; main()",
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "info",
    ]
    # /v1/models lists the Hugging Face cache too, and transformers 5.17 (the unsloth set) fails when it is missing.
    hub_cache = log_path.parent / "hf-hub-cache"
    hub_cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_CACHE": str(hub_cache)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _answers(f"http://127.0.0.1:{port}/v1/models"):
            if server.poll() is not None:
                raise RuntimeError(
                    f"transformers serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"transformers serve did not answer in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        # The server runs uvicorn in a non-daemon thread and may start helpers: end its whole process group.
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        except ProcessLookupError:
            server.wait(timeout=20)


def requests_in_log(log_path: Path, path: str) -> int:
    """How many requests for `path` (e.g. "/v1/chat/completions") the server's access log shows."""
    return len(re.findall(rf'"(?:GET|POST) {re.escape(path)} HTTP/1\.1" \d{{3}}', log_path.read_text()))
