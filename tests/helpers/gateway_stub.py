"""A scripted stand-in for the gateway: an HTTP server in a thread, on a free local port, whose paths answer
what a test tells them to, as the collection's nginx gateway and llama-cpp-python would.

Importing this module also makes the collection importable as ``ansible_collections.llmpods.inference``:
under ``ansible-test units`` it already is; under plain ``pytest`` from the checkout the tree is
``.build/collections`` (``make collection``), made here if missing. Import it before the collection.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import json
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLLECTIONS = ROOT / ".build" / "collections"


def _collection_importable() -> bool:
    try:
        return importlib.util.find_spec("ansible_collections.llmpods.inference") is not None
    except ImportError:
        return False


def collections_path() -> Path:
    """The directory that holds ``ansible_collections/llmpods/inference``."""
    for parent in ROOT.parents:
        if parent.name == "ansible_collections":
            return parent.parent
    return COLLECTIONS


if not _collection_importable():
    link = COLLECTIONS / "ansible_collections" / "llmpods" / "inference"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT, target_is_directory=True)
    sys.path.insert(0, str(COLLECTIONS))


@dataclass
class Reply:
    """One scripted answer: a status, a body (a dict is sent as JSON) and an optional delay first."""

    status: int = 200
    body: object = ""
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class ScriptedServer:
    """An HTTP server in a thread: each path answers its replies in turn, the last one from then on.

    Unknown paths answer 404. Every request is recorded in ``seen``.
    """

    def __init__(self, script: dict[str, list[Reply]], tls: TLSFiles | None = None) -> None:
        self.script = {path: list(replies) for path, replies in script.items()}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                reply = server.next_reply(Seen(self.command, self.path, dict(self.headers.items()), body))
                if reply.delay:
                    time.sleep(reply.delay)
                payload = reply.body if isinstance(reply.body, (str, bytes)) else json.dumps(reply.body)
                data = payload.encode() if isinstance(payload, str) else payload
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = _answer
            do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls.cert), str(tls.key))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def next_reply(self, seen: Seen) -> Reply:
        with self._lock:
            self.seen.append(seen)
            replies = self.script.get(seen.path.split("?")[0])
            if not replies:
                return Reply(404, {"detail": "Not Found"})
            return replies.pop(0) if len(replies) > 1 else replies[0]

    def requests(self, path: str) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if seen.path == path]

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TLSFiles:
    """A private CA and a server certificate for 127.0.0.1 signed by it, as PEM files in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("llmpods test CA", ca_key, "llmpods test CA", ca_key, ca=True)
    server_cert = certificate("127.0.0.1", server_key, "llmpods test CA", ca_key, ca=False)
    files = TLSFiles(ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


def closed_port() -> int:
    """A local port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Gateway answers, as the collection's nginx gateway and llama-cpp-python give them (test_gateway.py holds the
# gateway's answers to these, field for field).
def alive(model: str = "smollm2") -> Reply:
    return Reply(200, {"status": "ready", "model": model})


def loading(model: str = "smollm2") -> Reply:
    return Reply(
        503, {"status": "loading", "model": model, "message": "GET /v1/models on the inference backend: status 502"}
    )


def model_list(*ids: str) -> Reply:
    return Reply(200, {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "me"} for i in ids]})


def unauthorized() -> Reply:
    return Reply(
        401,
        {
            "error": {
                "message": "Invalid or missing API key. Send it as the header: Authorization: Bearer <key>",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        },
    )


def chat_completion(text: str = "OK", model: str = "smollm2") -> Reply:
    return Reply(
        200,
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 31, "completion_tokens": 1, "total_tokens": 32},
        },
    )
