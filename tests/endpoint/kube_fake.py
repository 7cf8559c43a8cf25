"""A stand-in Kubernetes API server on loopback: answers the pod calls KubernetesProvider makes
and records every request, so a test can also show that nothing called it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any


class FakeKubeAPI(ThreadingHTTPServer):
    """Serves on 127.0.0.1 (a free port) while used as a context manager."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _KubeHandler)
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def __enter__(self) -> FakeKubeAPI:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()
        self.server_close()

    def write_kubeconfig(self, path: Path) -> Path:
        """A kube config file whose one context is this server."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": f"http://127.0.0.1:{self.server_port}"}}],
            "users": [{"name": "test", "user": {"token": "not-a-real-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))
        return path


class _KubeHandler(BaseHTTPRequestHandler):
    server: FakeKubeAPI

    def log_message(self, *args: Any) -> None:
        pass

    def _record(self) -> None:
        with self.server.lock:
            self.server.requests.append(f"{self.command} {self.path}")

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self._record()
        pod = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        pod["metadata"]["namespace"] = self.path.split("/")[4]
        with self.server.lock:
            self.server.created.append(pod)
        self._reply(201, {**pod, "status": {"phase": "Pending"}})

    def do_GET(self) -> None:  # noqa: N802
        self._record()
        name = self.path.rstrip("/").split("/")[-1].split("?")[0]
        self._reply(200, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                          "status": {"phase": "Pending"}})

    def do_DELETE(self) -> None:  # noqa: N802
        self._record()
        name = self.path.rstrip("/").split("/")[-1].split("?")[0]
        with self.server.lock:
            self.server.deleted.append(name)
        self._reply(200, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                          "status": {"phase": "Running"}})
