"""Run the gateway the way the pod does, on this host: config rendered by the role, real nginx, real backend.

Shared by the gateway integration tests and bench/bench_gateway.py.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CONFIG_PLAYBOOK = ROOT / "tests" / "integration" / "playbooks" / "gateway_config.yml"
JS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")
SERVER_PACKAGE = ROOT / "files" / "docker" / "llmpods_server"
MODEL_NAME = "smollm2"


def nginx_ok() -> bool:
    return shutil.which("nginx") is not None and JS_MODULE.exists()


def write_keys(path: Path, keys: list[str], comment: str = "# API keys for the gateway tests") -> None:
    """Replace the keys file atomically, as the kubelet swaps a Secret volume."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text("\n".join([comment, "", *keys, ""]))
    tmp.chmod(0o644)
    tmp.replace(path)


def request(
    port: int,
    method: str,
    path: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    body: dict | None = None,
    timeout: float = 60,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with exactly the headers given (repeats allowed). Returns status, headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        data = json.dumps(body).encode() if body is not None else b""
        for name, value in headers or []:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
        if body is not None or method == "POST":
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data or None)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
    finally:
        conn.close()


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not met after {timeout} s; last seen: {last!r}")


class Backend:
    """llama-cpp-python serving the demo model (the project's llmpods_server when it is there)."""

    def __init__(self, model: Path, port: int, log: Path, alias: str = MODEL_NAME):
        self.model, self.port, self.log, self.alias = model, port, log, alias
        self.proc: subprocess.Popen | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        env.update(
            MODEL=str(self.model),
            MODEL_ALIAS=self.alias,
            INTERRUPT_REQUESTS="false",
            HOST="127.0.0.1",
            PORT=str(self.port),
            N_CTX="2048",
            PYTHONUNBUFFERED="1",
        )
        if (SERVER_PACKAGE / "__main__.py").exists():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SERVER_PACKAGE.parent), env.get("PYTHONPATH")]))
            return [sys.executable, "-m", "llmpods_server"], env
        return [sys.executable, "-m", "llama_cpp.server"], env

    def start(self) -> Backend:
        cmd, env = self.command()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def wait_ready(self, timeout: float = 180) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            return request(self.port, "GET", "/v1/models", timeout=5)[0] == 200

        wait_for(up, timeout, 0.2, "backend /v1/models 200")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def requests_seen(self) -> list[str]:
        """Request lines from uvicorn's access log, without the gateway's readiness probes."""
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if ' HTTP/1.1" ' in line]
        return [line for line in lines if "/_llmpods/" not in line]


class Gateway:
    """nginx running the config that roles/gateway renders."""

    def __init__(self, root: Path, *, upstream_port: int, listen_port: int, model: str = MODEL_NAME, **extra):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config_dir = root / "config"
        self.run_dir = root / "run"
        self.keys_file = root / "api-keys"
        self.access_log = root / "access.log"
        self.error_log = root / "error.log"
        self.port = listen_port
        self.vars = {
            "gateway_model_name": model,
            "gateway_config_dir": str(self.config_dir),
            "gateway_run_dir": str(self.run_dir),
            "gateway_keys_file": str(self.keys_file),
            "gateway_listen_port": listen_port,
            "gateway_upstream_port": upstream_port,
            # Started as root, nginx would run its workers as nobody, who cannot read a test's files.
            "gateway_user": "root" if os.geteuid() == 0 else "",
            **extra,
        }
        self.proc: subprocess.Popen | None = None

    def render(self, run_playbook) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        result = run_playbook(CONFIG_PLAYBOOK, self.vars)
        assert result.rc == 0, result.failure()

    def start(self) -> Gateway:
        with self.access_log.open("ab") as out, self.error_log.open("ab") as err:
            self.proc = subprocess.Popen(
                ["nginx", "-c", str(self.config_dir / "nginx.conf"), "-g", "daemon off;"], stdout=out, stderr=err
            )
        wait_for(lambda: request(self.port, "GET", "/healthz", timeout=2)[0] == 200, 15, what="gateway /healthz")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self, timeout: float = 10) -> tuple[int, dict]:
        status, _unused, body = request(self.port, "GET", "/alive", timeout=timeout)
        return status, json.loads(body)


class Recorder:
    """A stand-in upstream that records the path and headers of every request it gets."""

    def __init__(self, port: int, model: str = MODEL_NAME):
        self.seen: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if self.path == "/v1/models":
                    body, status = {"object": "list", "data": [{"id": model, "object": "model"}]}, 200
                else:
                    body, status = {"path": self.path}, 200
                if not self.path.startswith("/_llmpods/"):
                    recorder.seen.append(
                        {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}
                    )
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Recorder:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
