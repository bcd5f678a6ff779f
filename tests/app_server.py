"""Start the Gradio demo (examples/story_diffusion/app.py) on the tiny model as a subprocess on a free port of
127.0.0.1, wait until it answers, and stop it afterwards, for tests/test_app*.py."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "story_diffusion" / "app.py"
START_TIMEOUT = 300  # seconds: importing MindSpore and Gradio on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serve_app(folder: Path, *extra: str) -> Iterator[str]:
    """The app's URL while it runs; its outputs go to ``folder / "outputs"``, its log to ``folder / "app.log"``."""
    port, log_path = free_port(), folder / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    env.setdefault("MINDONE_STORY_CACHE", str(ROOT / ".cache" / "test"))  # the tests' tiny model, as conftest.py
    command = [sys.executable, str(APP), "--sd_model_name", "tiny", "--port", str(port)]
    command += ["--output_dir", str(folder / "outputs"), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + START_TIMEOUT
        while not _answers(url):
            if proc.poll() is not None or time.time() > deadline:
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "did not answer in time"
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the app {state}; its log ends with:\n{tail}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def app_log(folder: Path) -> str:
    return (folder / "app.log").read_text(errors="replace")
