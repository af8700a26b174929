"""Fault-injecting HTTP reverse proxy for engine tests (stdlib only).

Sits between an OpenAI-compatible client and a real vLLM server on 127.0.0.1 and
injects deterministic faults (429/500/503, dropped connections, a wrong API key,
the server stopping mid-run), optionally rewriting chat answers into the
reasoning-model shape, so the engine's retry/resume/normalisation paths can be
exercised against real generations.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Sequence
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULT_KINDS = ("ok", "429", "500", "503", "drop")
_FWD_HEADERS = ("Content-Type", "Authorization", "Accept")


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True  # a new proxy may rebind the same port after stop()
    daemon_threads = True
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # quiet: clients and stop() may close sockets under a handler


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: nothing pooled survives stop()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.proxy._handle(self, "GET", b"")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.proxy._handle(self, "POST", body)


def _error_body(message: str, kind: str, code: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


def _to_reasoning(body: bytes) -> bytes:
    """content -> reasoning_content (stripped); content := <answer>{len}</answer>."""
    try:
        data = json.loads(body)
        for choice in data.get("choices") or []:
            msg = choice.get("message") or {}
            text = (msg.get("content") or "").strip()
            msg.pop("reasoning", None)
            msg["reasoning_content"] = text
            msg["content"] = f"<answer>{len(text)}</answer>"
    except (ValueError, AttributeError, TypeError):
        return body  # not the JSON we expected: pass through untouched
    return json.dumps(data).encode()


class FaultProxy:
    def __init__(self, upstream: str, *, port: int = 0, faults: Sequence[str] = (),
                 retry_after: float | None = 0.05, reasoning: bool = False, delay_s: float = 0.0,
                 require_key: str | None = None, stop_after: int | None = None, refuse_n: bool = False) -> None:
        bad = [f for f in faults if f not in FAULT_KINDS]
        if bad:
            raise ValueError(f"unknown fault kinds {bad}; expected {FAULT_KINDS}")
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"upstream must be a loopback address, got {upstream!r}")
        self._up_host, self._up_port = parts.hostname, parts.port or 80
        self.faults = list(faults)
        self.retry_after, self.reasoning, self.delay_s = retry_after, reasoning, delay_s
        self.require_key, self.stop_after = require_key, stop_after
        self.refuse_n = refuse_n  # answer 400 to a request asking for n > 1 (servers without `n`)
        self.n_seen: list[int] = []  # each forwarded or refused POST's n
        self._port_wanted = port
        self._lock = threading.Lock()
        self.requests = 0  # POSTs received
        self.forwarded = 0  # POSTs forwarded upstream and answered 200
        self.faults_served: dict[str, int] = {}
        self.keys_seen: set[str] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stopped = threading.Event()  # set once stop() has finished (e.g. after stop_after)
        self._inflight: set[socket.socket] = set()
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultProxy:
        self._server = _Server(("127.0.0.1", self._port_wanted), _Handler)
        self._server.proxy = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"fault-proxy-{self.port}",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            server, self._server = self._server, None
            inflight, self._inflight = list(self._inflight), set()
        if server is not None:
            server.shutdown()
            server.server_close()  # listening socket closed: new connections are refused
        for sock in inflight:  # a stopped server answers nothing still in flight
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.stopped.set()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _count(self, kind: str) -> None:
        with self._lock:
            self.faults_served[kind] = self.faults_served.get(kind, 0) + 1

    # -- request handling -------------------------------------------------------------
    def _handle(self, h: _Handler, method: str, body: bytes) -> None:
        auth = h.headers.get("Authorization")
        with self._lock:
            if auth is not None:
                self.keys_seen.add(auth)
            if method == "GET":
                kind = "ok"
            else:
                if self._stopping:
                    kind = "drop"  # stop_after reached, stop() not finished yet
                else:
                    kind = self.faults[self.requests % len(self.faults)] if self.faults else "ok"
                self.requests += 1
            self._inflight.add(h.connection)
        try:
            if method == "POST" and self.require_key is not None and auth != f"Bearer {self.require_key}":
                self._count("401")
                return self._reply(h, 401, _error_body("invalid api key (fault proxy)", "authentication_error", 401))
            if method == "POST" and kind == "ok":
                n = int((json.loads(body or b"{}") or {}).get("n") or 1)
                with self._lock:
                    self.n_seen.append(n)
                if self.refuse_n and n > 1:
                    self._count("400")
                    return self._reply(h, 400, _error_body("n > 1 is not supported (fault proxy)",
                                                           "invalid_request_error", 400))
            if kind == "drop":
                self._count(kind)
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)  # client sees a connection closed without response
                return None
            if kind in ("429", "500", "503"):
                self._count(kind)
                code = int(kind)
                msg = "rate limited (fault proxy)" if code == 429 else f"server error {code} (fault proxy)"
                extra = {"Retry-After": str(self.retry_after)} if code == 429 and self.retry_after is not None else {}
                etype = "rate_limit" if code == 429 else "server_error"
                return self._reply(h, code, _error_body(msg, etype, code), extra=extra)
            self._forward(h, method, body)
        finally:
            with self._lock:
                self._inflight.discard(h.connection)

    def _forward(self, h: _Handler, method: str, body: bytes) -> None:
        if method == "POST" and self.delay_s > 0:
            time.sleep(self.delay_s)
            if self._stopping:
                return None  # stopped meanwhile: the connection closes without a response
        headers = {k: v for k in _FWD_HEADERS if (v := h.headers.get(k)) is not None}
        conn = HTTPConnection(self._up_host, self._up_port, timeout=600)
        try:
            conn.request(method, h.path, body=body if method == "POST" else None, headers=headers)
            resp = conn.getresponse()
            status, ctype, data = resp.status, resp.getheader("Content-Type"), resp.read()
        except OSError as e:
            return self._reply(h, 502, _error_body(f"upstream unreachable: {e}", "bad_gateway", 502))
        finally:
            conn.close()
        path = h.path.split("?", 1)[0]
        if method == "POST" and status == 200 and self.reasoning and path.endswith("/chat/completions"):
            data = _to_reasoning(data)
        trigger = False
        if method == "POST" and status == 200:
            with self._lock:  # count before replying, so a client never sees a stale counter
                self.forwarded += 1
                trigger = self.stop_after is not None and self.forwarded >= self.stop_after and not self._stopping
                if trigger:
                    self._stopping = True  # answer nothing more; stop() itself runs in another thread
                    self._inflight.discard(h.connection)
        self._reply(h, status, data, ctype=ctype or "application/json")
        if trigger:
            threading.Thread(target=self.stop, daemon=True).start()

    @staticmethod
    def _reply(h: _Handler, status: int, body: bytes, *, ctype: str = "application/json",
               extra: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
