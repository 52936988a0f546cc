"""A loopback LLM backend that records what reaches it: the Ollama API (/api/chat, /api/generate, /api/show,
/api/tags) and the OpenAI chat API (/chat/completions, /v1/chat/completions), so a test can check what the
proxy forwarded (path, model name, messages, Authorization header).

Also the stand-in backend image's server (`python3 stub_backend.py --host 0.0.0.0 --port 11434`): there a
test reads what reached it from GET /_kaos/seen, since it cannot reach into the pod's memory."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLY = "hello from the stub backend"
SEEN_PATH = "/_kaos/seen"  # not an LLM API path: lists the requests received so far, oldest first


@dataclass(frozen=True)
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Backend:
    url: str
    seen: list[Seen] = field(default_factory=list)

    def last(self) -> Seen:
        assert self.seen, "the backend received no request"
        return self.seen[-1]

    def chats(self) -> list[Seen]:
        return [s for s in self.seen if s.path.endswith(("/chat", "/generate", "/chat/completions"))]


def _ollama_chat(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": body.get("model"),
        "created_at": "2026-01-01T00:00:00Z",
        "message": {"role": "assistant", "content": REPLY},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 3,
        "eval_count": 5,
    }


def _ollama_generate(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": body.get("model"),
        "created_at": "2026-01-01T00:00:00Z",
        "response": REPLY,
        "done": True,
        "prompt_eval_count": 3,
        "eval_count": 5,
    }


def _openai_chat(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }


def _answer(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    if path.endswith("/chat/completions"):
        return _openai_chat(body)
    if path == "/api/chat":
        return _ollama_chat(body)
    if path == "/api/generate":
        return _ollama_generate(body)
    if path == "/api/show":  # LiteLLM asks for model details after an ollama/ completion
        return {"model_info": {}, "details": {}, "capabilities": ["completion"]}
    if path == "/api/tags":
        return {"models": []}
    return None


def _handler(backend: Backend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else {}
            path = self.path.split("?", 1)[0]
            if path == SEEN_PATH:
                self._reply(200, [{"path": s.path, "headers": s.headers, "body": s.body} for s in backend.seen])
                return
            backend.seen.append(Seen(path, {k.lower(): v for k, v in self.headers.items()}, body))
            answer = _answer(path, body)
            if answer is None:
                self._reply(404, {"error": f"no route {path}"})
            else:
                self._reply(200, answer)

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = _serve
        do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


@contextmanager
def running_backend() -> Iterator[Backend]:
    """Serve on a free loopback port (port 0: the kernel picks it, so parallel runs never collide)."""
    backend = Backend(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(backend))
    backend.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the stub LLM backend until killed.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), _handler(Backend(url=f"http://{args.host}:{args.port}")))
    print(f"stub backend serving on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
