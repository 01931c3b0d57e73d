"""Run the gateway the way the pod does, on this host: config rendered by the role, real nginx, real backend.

Shared by the gateway integration tests and bench/bench_gateway.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from helpers.env import ROOT, free_port

CONFIG_PLAYBOOK = ROOT / "tests" / "integration" / "playbooks" / "gateway_config.yml"
JS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")
SERVER_PACKAGE = ROOT / "files" / "docker" / "llmpods_server"
LLAMA_SERVER = Path(sys.executable).parent / "llama-server"
BACKENDS = ("llama-cpp-python", "llama-server")
TESTS = ROOT / "tests"
MODEL_NAME = "smollm2"
# What a response must never show a client: a Python traceback, or the server's own file paths.
LEAKS = ("Traceback", 'File "', "site-packages", "llama_cpp/", "llmpods_server/", "<html")


def backend_available(kind: str) -> tuple[bool, str]:
    """Whether the backend ``kind`` can run here, and what it needs, for conftest.need()."""
    return (
        kind != "llama-server" or LLAMA_SERVER.exists(),
        f"llama-server in the venv ({LLAMA_SERVER}; `make dev` takes it out of the CPU image)",
    )


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


def raw_request(port: int, data: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are on a new connection; return the status, headers and body of the first response.

    The status is 0 when the connection closed without a response.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the gateway may answer and close before it has read everything
            sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        head_only = data.startswith(b"HEAD ")
        while time.monotonic() < deadline and not response_complete(received, head_only):
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
    return parse_response(received)


def _final(received: bytes) -> bytes:
    """Without interim responses (100 Continue)."""
    while received.startswith(b"HTTP/1.1 100") and b"\r\n\r\n" in received:
        received = received.partition(b"\r\n\r\n")[2]
    return received


def response_complete(received: bytes, head_only: bool = False) -> bool:
    head, sep, rest = _final(received).partition(b"\r\n\r\n")
    if not sep:
        return False
    if head_only:
        return True
    headers = head.lower()
    if b"transfer-encoding: chunked" in headers:
        return rest.endswith(b"0\r\n\r\n")
    for line in headers.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(rest) >= int(line.split(b":")[1])
    return head.startswith((b"HTTP/1.1 1", b"HTTP/1.1 204", b"HTTP/1.1 304"))


def parse_response(received: bytes) -> tuple[int, dict[str, str], bytes]:
    """The first final HTTP/1.x response in ``received`` (a chunked body is decoded)."""
    head, _sep, rest = _final(received).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/"):
        return 0, {}, received
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _sep, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while rest:
            size_line, _sep, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2 :]
        return status, headers, body
    if "content-length" in headers:
        return status, headers, rest[: int(headers["content-length"])]
    return status, headers, rest


def error_of(body: bytes) -> dict:
    """The OpenAI-style error in a response body; fails the test when there is none."""
    text = body.decode("utf-8", "replace")
    for leak in LEAKS:
        assert leak not in text, f"the answer shows {leak!r}: {text[:500]}"
    error = json.loads(body)["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert error["message"] and error["type"] in ("invalid_request_error", "server_error"), error
    return error


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


def llama_server_env(model: str, alias: str, host: str, port: int, parallel: int = 4) -> dict[str, str]:
    """The variables the chart starts llama-server with (deployment.yaml), on the CPU, with 2048 tokens per slot."""
    return {
        "LLAMA_ARG_MODEL": model,
        "LLAMA_ARG_ALIAS": alias,
        "LLAMA_ARG_N_PARALLEL": str(parallel),
        "LLAMA_ARG_CTX_SIZE": str(2048 * parallel),
        "LLAMA_ARG_KV_UNIFIED": "false",
        "LLAMA_ARG_THREADS": "2",
        "LLAMA_ARG_N_GPU_LAYERS": "0",
        "LLAMA_ARG_HOST": host,
        "LLAMA_ARG_PORT": str(port),
        "LLAMA_ARG_ENDPOINT_METRICS": "true",
        "LLAMA_ARG_UI": "false",
    }


class Backend:
    """One of the image's inference servers serving the demo model, as the pod runs it.

    ``kind`` is the backend: ``llama-cpp-python`` (the project's llmpods_server, from this venv) or ``llama-server``
    (llama.cpp's server, the binary `make dev` takes out of the CPU image's build stage into this venv).
    """

    def __init__(
        self,
        model: Path,
        port: int,
        log: Path,
        alias: str = MODEL_NAME,
        module: str = "llmpods_server",
        kind: str = "llama-cpp-python",
        parallel: int = 4,
        binary: Path = LLAMA_SERVER,
        env: dict[str, str] | None = None,
    ):
        self.model, self.port, self.log, self.alias, self.module = model, port, log, alias, module
        self.kind, self.parallel, self.binary = kind, parallel, binary
        self.extra_env = env or {}  # set last, over the chart's settings (bench: threads, GPU layers)
        self.proc: subprocess.Popen | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        if self.kind == "llama-server":
            return self._llama_server_command()
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
        # Always the project's server: a stand-in (upstream llama_cpp.server) would let a test pass without it.
        if not (SERVER_PACKAGE / "__main__.py").exists():
            raise FileNotFoundError(f"the inference server package is missing: {SERVER_PACKAGE}")
        path = [str(SERVER_PACKAGE.parent), str(TESTS), env.get("PYTHONPATH")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # keep files/docker free of __pycache__
        return [sys.executable, "-m", self.module], env

    def _llama_server_command(self) -> tuple[list[str], dict[str, str]]:
        binary = self.binary
        if not binary.exists():
            raise FileNotFoundError(f"llama-server is missing: {binary} (`make dev` takes it out of the CPU image)")
        env = {**os.environ, **llama_server_env(str(self.model), self.alias, "127.0.0.1", self.port, self.parallel)}
        return [str(binary)], env

    def start(self) -> Backend:
        cmd, env = self.command()
        env.update(self.extra_env)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def wait_ready(self, timeout: float = 180) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            # llama-server lists the model before it is loaded; its /health waits for the load.
            path = "/health" if self.kind == "llama-server" else "/v1/models"
            return request(self.port, "GET", path, timeout=5)[0] == 200

        wait_for(up, timeout, 0.2, "backend ready")

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
        self.metrics_port = free_port()
        self.vars = {
            "gateway_model_name": model,
            "gateway_metrics_port": self.metrics_port,
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
        # Every request, the gateway's readiness checks included: method, path, headers and the body it carried.
        self.everything: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                received = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                seen = {"method": self.command, "path": self.path, "headers": headers, "body": received}
                recorder.everything.append(seen)
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


class MisbehavingUpstream:
    """A stand-in backend, on raw sockets, that closes connections the way a failing server does.

    ``close_after_500``: a POST whose body holds ``"fail"`` gets a complete 500 that says nothing of closing,
    and then the connection is closed; every other request gets a 200 on a connection kept alive.
    ``stale``: the first request on a connection gets a 200 and the connection is kept alive; the next request on
    it is read and the connection closed without an answer (a backend closing an idle connection as a request
    arrives). ``seen`` lists (method, path) for every request read.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.seen: list[tuple[str, str]] = []
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                reader = self.request.makefile("rb")
                served = 0
                while True:
                    request_line = reader.readline()
                    if not request_line:
                        return
                    headers = {}
                    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                        name, _sep, value = line.decode("latin-1").partition(":")
                        headers[name.strip().lower()] = value.strip()
                    body = reader.read(int(headers.get("content-length") or 0))
                    method, path = request_line.decode("latin-1").split()[:2]
                    upstream.seen.append((method, path))
                    served += 1
                    if upstream.mode == "stale" and served > 1:
                        return
                    if upstream.mode == "close_after_500" and b"fail" in body:
                        self.request.sendall(upstream.response(500, {"error": "injected"}))
                        return
                    self.request.sendall(upstream.response(200, {"path": path}))

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @staticmethod
    def response(status: int, payload: dict) -> bytes:
        data = json.dumps(payload).encode()
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        return head.encode() + data

    def start(self) -> MisbehavingUpstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
