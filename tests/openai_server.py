"""A fake OpenAI-compatible HTTP server for tests (standard library only).

It answers ``POST /v1/chat/completions`` and ``POST /v1/embeddings`` in the OpenAI wire format with
deterministic content (:func:`fake_reply`, :func:`fake_embedding`) and ``GET /stats`` with its counters.
Faults are scripted per request number (``faults_by_number[n]``, 1-based over all POSTs) or per prompt
(``faults_by_prompt[prompt]``: a list consumed one fault per request containing that prompt / input), or
for every request (``fault_all``):

    "429"            HTTP 429 with ``retry-after-ms`` (``retry_after`` seconds)
    "500"            HTTP 500 with ``retry-after-ms`` (so that retries are quick)
    "400"            HTTP 400 (not retryable), its message echoing the Authorization header
    "401"            HTTP 401 "Invalid API key" (stops a run)
    "404"            HTTP 404 "The model ... does not exist" (stops a run)
    "per_token"      one vector per token for each input (embeddings of a server without pooling)
    "slow"           the normal answer after ``slow_seconds`` (past a short client timeout)
    "malformed"      HTTP 200 with a body that is not valid JSON
    "empty_choices"  no choices (chat) / no data (embeddings)
    "empty_content"  empty message content (chat) / empty vectors (embeddings)
    "nan"            NaN vectors (embeddings)

Run standalone with ``python tests/openai_server.py --port-file F``: the port is written to F once serving.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def fake_reply(prompt: str) -> str:
    """The deterministic chat answer for a prompt."""
    return f"Description {hashlib.sha256(prompt.encode()).hexdigest()[:16]} of: {prompt[:40].strip()}"


def fake_embedding(text: str, dim: int = 8) -> list[float]:
    """A deterministic unit vector for a text."""
    digest = hashlib.sha256(text.encode()).digest() * (dim // 32 + 1)
    values = [(byte - 127.5) / 127.5 for byte in digest[:dim]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Clients that timed out close their socket; the late write fails quietly."""


class FakeOpenAIServer:
    """The fake server, serving from a background thread on ``127.0.0.1`` (an ephemeral port by default).

    Attributes:
        counts: requests that reached the server per prompt (chat) or input text (embeddings).
        headers: the headers of every POST, in arrival order.
        batch_sizes: the number of inputs of every embeddings request, in arrival order.
        batches: the inputs of every embeddings request, in arrival order (concurrent requests arrive in any
            order).
        delay: seconds every answer waits (to slow a run down).
        max_in_flight: the most POSTs handled at once.
    """

    def __init__(self, *, port: int = 0, dim: int = 8, slow_seconds: float = 1.0, retry_after: float = 0.01) -> None:
        self.dim, self.slow_seconds, self.retry_after, self.delay = dim, slow_seconds, retry_after, 0.0
        self.faults_by_prompt: dict[str, list[str]] = {}
        self.faults_by_number: dict[int, str] = {}
        self.fault_all: str | None = None
        self.bodies: list[dict] = []
        self.counts: Counter[str] = Counter()
        self.headers: list[dict[str, str]] = []
        self.batch_sizes: list[int] = []
        self.batches: list[list[str]] = []
        self.requests = 0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", port), _handler(self))

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop`."""
        self._httpd.serve_forever(poll_interval=0.05)

    def start(self) -> FakeOpenAIServer:
        """Serve from a daemon thread."""
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, headers: dict[str, str], prompts: list[str]) -> str | None:
        """Count the request and pick its fault (by number first, then by prompt)."""
        with self.lock:
            self.requests += 1
            self.headers.append(headers)
            self.counts.update(prompts)
            fault = self.faults_by_number.pop(self.requests, None) or self.fault_all
            for prompt in prompts:
                if fault is None and self.faults_by_prompt.get(prompt):
                    fault = self.faults_by_prompt[prompt].pop(0)
            return fault

    def answer(self, path: str, headers: dict[str, str], body: dict) -> tuple[int, dict[str, str], bytes]:
        """(status, extra headers, body) for one POST."""
        chat = path.endswith("/chat/completions")
        if chat:
            prompts = [m["content"] for m in body["messages"] if m["role"] == "user"][-1:]
        elif path.endswith("/embeddings"):
            prompts = [body["input"]] if isinstance(body["input"], str) else list(body["input"])
            with self.lock:
                self.batch_sizes.append(len(prompts))
                self.batches.append(prompts)
        else:
            return 404, {}, json.dumps({"error": {"message": f"no route {path}"}}).encode()
        fault = self._record(headers, prompts)
        with self.lock:
            self.bodies.append(body)
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(self.delay + (self.slow_seconds if fault == "slow" else 0.0))
        with self.lock:
            self.in_flight -= 1
        if fault in ("429", "500", "400", "401", "404"):
            extra = {"retry-after-ms": str(int(self.retry_after * 1000))} if fault in ("429", "500") else {}
            message = f"injected {fault}"
            if fault == "400":  # like OpenAI's "Incorrect API key provided: ...", it echoes the credentials
                message += f"; you sent {headers.get('authorization', '')}"
            if fault == "401":
                message = "Invalid API key"
            if fault == "404":
                message = f"The model `{body.get('model')}` does not exist"
            return int(fault), extra, json.dumps({"error": {"message": message, "type": "fake"}}).encode()
        if fault == "malformed":
            return 200, {}, b'{"choices": [ {"index": 0, "mess'
        if chat:
            content = "" if fault == "empty_content" else fake_reply(prompts[0])
            choices = [] if fault == "empty_choices" else [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ]  # fmt: skip
            words = sum(len(m["content"].split()) for m in body["messages"])
            usage = {"prompt_tokens": words, "completion_tokens": len(content.split())}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            reply = {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                     "model": body["model"], "choices": choices, "usage": usage}  # fmt: skip
        else:
            vectors = [fake_embedding(t, self.dim) for t in prompts]
            if fault in ("empty_content", "nan"):
                vectors = [[] if fault == "empty_content" else [math.nan] * self.dim for _ in prompts]
            if fault == "per_token":
                vectors = [[fake_embedding(word, self.dim) for word in t.split()] for t in prompts]
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
            words = sum(len(t.split()) for t in prompts)
            reply = {"object": "list", "model": body["model"], "data": [] if fault == "empty_choices" else data,
                     "usage": {"prompt_tokens": words, "total_tokens": words}}  # fmt: skip
        return 200, {}, json.dumps(reply).encode()

    def stats(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "counts": dict(self.counts)}


def _handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

        def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/stats":
                self._send(200, {}, json.dumps(server.stats()).encode())
            else:
                self._send(404, {}, b'{"error": {"message": "not found"}}')

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            self._send(*server.answer(self.path, {name.lower(): value for name, value in self.headers.items()}, body))

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True, help="write the port here once serving")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds every answer waits")
    parser.add_argument("--dim", type=int, default=8, help="embedding dimension")
    args = parser.parse_args()
    server = FakeOpenAIServer(dim=args.dim)
    server.delay = args.delay
    partial = f"{args.port_file}.tmp"
    with open(partial, "w") as handle:
        handle.write(str(server.port))
    os.replace(partial, args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
