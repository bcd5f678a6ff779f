"""A Hugging Face Hub of our own on 127.0.0.1, for the download tests: the endpoints huggingface_hub 0.36 calls for
``model_info`` and ``hf_hub_download`` / ``snapshot_download``, and nothing else.

- ``GET /api/models/{repo}[/revision/{rev}]``: id, sha, siblings (with sizes when ``blobs=true``), gated.
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag``, ``Content-Length``; ``Range: bytes=N-``
  answers 206 (a resumed download).
- Errors as the hub sends them: 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``,
  and 401 ``GatedRepo`` for a gated repository without the right ``Authorization: Bearer`` token.

Every request is logged as (method, path, Range header). ``cut[path] = n`` makes the next GET of that file send its
headers and n bytes, then drop the connection; ``slow[path] = s`` sends that file's body over about s seconds.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

from mindone_story.weights.safetensors_io import SafetensorsFile, save_safetensors


def tiny_repositories(tiny: Path, scratch: Path) -> dict[str, dict[str, bytes]]:
    """The built-in tiny model published as the hub would hold RealVisXL_V4.0 and h94/IP-Adapter: safetensors with
    ``.bin``, fp16, flax and onnx duplicates beside them, and a single-file checkpoint at the root (none of which a
    filtered download may fetch except the fp16 files for an fp16 run)."""
    pipeline = {str(f.relative_to(tiny)): f.read_bytes() for f in sorted(tiny.rglob("*")) if f.is_file()}
    for name in ("image_encoder/config.json", "image_encoder/model.safetensors"):
        pipeline.pop(name)
    pipeline.pop(next(n for n in pipeline if n.startswith("ip_adapter/")))
    for name in [n for n in pipeline if n.endswith(".safetensors")]:
        folder, _, file = name.rpartition("/")
        stem = file.removesuffix(".safetensors")
        source = SafetensorsFile(tiny / name)
        save_safetensors({k: np.asarray(source[k]).astype(np.float16) for k in source}, scratch / f"{stem}.fp16")
        pipeline[f"{folder}/{stem}.fp16.safetensors"] = (scratch / f"{stem}.fp16").read_bytes()
        pipeline[f"{folder}/{'pytorch_model' if stem == 'model' else stem}.bin"] = b"PK" + bytes(64)  # never fetched
        pipeline[f"{folder}/{'flax_model.msgpack' if stem == 'model' else 'model.onnx'}"] = bytes(32)
    pipeline["RealVisXL_V4.0.safetensors"] = bytes(256)
    pipeline["README.md"] = b"# tiny\n"
    adapter = {
        "sdxl_models/ip-adapter_sdxl.safetensors": (tiny / "ip_adapter/ip-adapter_sdxl.safetensors").read_bytes(),
        "sdxl_models/ip-adapter_sdxl.bin": b"PK" + bytes(64),
        "sdxl_models/image_encoder/config.json": (tiny / "image_encoder/config.json").read_bytes(),
        "sdxl_models/image_encoder/model.safetensors": (tiny / "image_encoder/model.safetensors").read_bytes(),
        "sdxl_models/image_encoder/pytorch_model.bin": b"PK" + bytes(64),
        "models/ip-adapter_sd15.safetensors": bytes(128),
        "README.md": b"# adapter\n",
    }
    return {"SG161222/RealVisXL_V4.0": pipeline, "h94/IP-Adapter": adapter, "gated/tiny": dict(pipeline)}


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], gated: dict[str, str] | None = None):
        self.repos, self.gated = repos, gated or {}  # gated: repo -> the one token that may read it
        self.sha = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
        self.log: list[tuple[str, str, str | None]] = []
        self.cut: dict[str, int] = {}
        self.slow: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def files_requested(self) -> set[str]:
        """``repo/path`` of every file fetched or looked up (HEAD or GET; API calls excluded)."""
        parts = [path.strip("/").split("/", 4) for _, path, _ in self.log]
        return {f"{p[0]}/{p[1]}/{p[4]}" for p in parts if len(p) == 5 and p[2] == "resolve"}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _error(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                with hub._lock:
                    hub.log.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[0] == "api" and len(parts) >= 4 and parts[1] == "models":
                    return self._info(
                        "/".join(parts[2:4]), parts[5] if len(parts) > 5 else "main", "blobs=true" in self.path.lower()
                    )
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
                self._error(404, "RepoNotFound")

            def _revision_ok(self, repo: str, revision: str) -> bool:
                return revision in ("main", hub.sha[repo])

            def _info(self, repo: str, revision: str, blobs: bool) -> None:
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound")
                if not self._revision_ok(repo, revision):
                    return self._error(404, "RevisionNotFound")
                siblings = [{"rfilename": n, **({"size": len(b)} if blobs else {})} for n, b in hub.repos[repo].items()]
                data = json.dumps(
                    {
                        "id": repo,
                        "sha": hub.sha[repo],
                        "siblings": siblings,
                        "gated": "manual" if repo in hub.gated else False,
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _file(self, repo: str, revision: str, name: str, body: bool) -> None:
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound")
                if repo in hub.gated and self.headers.get("Authorization") != f"Bearer {hub.gated[repo]}":
                    return self._error(401, "GatedRepo")
                if not self._revision_ok(repo, revision):
                    return self._error(404, "RevisionNotFound")
                if name not in hub.repos[repo]:
                    return self._error(404, "EntryNotFound")
                data = hub.repos[repo][name]
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.sha[repo])
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                with hub._lock:
                    cut = hub.cut.pop(f"{repo}/{name}", None)
                if cut is None:
                    pieces = 20 if f"{repo}/{name}" in hub.slow else 1
                    step = -(-(len(data) - start) // pieces)
                    for i in range(start, len(data), step):
                        self.wfile.write(data[i : i + step])
                        time.sleep(hub.slow.get(f"{repo}/{name}", 0) / pieces)
                    return
                self.wfile.write(data[start : start + cut])  # then drop the connection mid-file
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

        return Handler
