"""A chat-completions server on 127.0.0.1 that records requests and plays scripted replies (the rephraser's
OpenAI-compatible back-end talks to it in the tests), and the answers and images the tests send it."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def make_images(n: int, seed: int = 0, size: tuple[int, int] = (48, 40)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def good_answer(descriptions: list[str], prompt: str | None = None) -> str:
    subjects = [{"index": k, "description": d} for k, d in enumerate(descriptions, start=1)]
    prompt = prompt or ", and ".join(descriptions) + " eat together at a table, slow dolly-in."
    return json.dumps({"subjects": subjects, "prompt": prompt})


class ChatServer:
    """A chat-completions server on 127.0.0.1 that records requests and plays scripted replies.

    `script` items: {"status": int, "content": str | None, "body": dict | str, "delay": s, "refusal": str,
    "trickle": (bytes, seconds)}: with "trickle", the body is written that many bytes at a time with that pause
    in between (headers first). When the script runs out, the last item repeats.
    """

    def __init__(self, script: list[dict]):
        self.script, self.requests = list(script), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                length = int(self.headers.get("Content-Length", 0))
                server.requests.append({"path": self.path, "headers": dict(self.headers),
                                        "json": json.loads(self.rfile.read(length))})
                item = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                time.sleep(item.get("delay", 0))
                body = item.get("body")
                if body is None:
                    message = {"role": "assistant", "content": item.get("content")}
                    if item.get("refusal"):
                        message["refusal"] = item["refusal"]
                    body = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                try:
                    self.send_response(item.get("status", 200))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    step, pause = item.get("trickle", (len(data), 0.0))
                    for start in range(0, len(data), max(1, step)):
                        self.wfile.write(data[start:start + step])
                        self.wfile.flush()
                        time.sleep(pause)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
