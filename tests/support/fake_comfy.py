"""A stand-in ComfyUI for the batch tool's scheduling tests: an in-process ``http.server`` answering just the
endpoints ``tools/phantom_batch.py`` calls (/upload/image, /prompt, /history/{id}, /queue, /interrupt, /view), with
each prompt "running" for ``run_s`` seconds and then finished with one MP4 whose bytes are its file name. It can die
on its n-th prompt (it answers that /prompt, then closes its socket: later requests are refused) or forget its
prompts (a restart: neither /history nor /queue knows them)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class FakeComfy:
    """``FakeComfy(run_s, die_on=n | None, forget=False)``; ``.url``; ``.prompts``: ``[(prompt_id, job id)]`` in
    the order received; ``.max_in_flight``: most prompts that were unfinished at once."""

    def __init__(self, run_s: float = 0.2, die_on: int | None = None, forget: bool = False) -> None:
        self.run_s, self.die_on, self.forget = run_s, die_on, forget
        self.prompts: list[tuple[str, str]] = []
        self.started: dict[str, float] = {}  # prompt id -> time.monotonic() at /prompt
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def finished(self, prompt_id: str) -> bool:
        return time.monotonic() - self.started[prompt_id] >= self.run_s

    def on_prompt(self, body: dict) -> dict:
        """Accept a prompt: its job id is the save node's filename_prefix ``phantom_batch/<id>``."""
        prefix = next(n["inputs"]["filename_prefix"] for n in body["prompt"].values()
                      if n["class_type"] == "PhantomSaveVideo")
        prompt_id = uuid.uuid4().hex
        with self.lock:
            in_flight = sum(not self.finished(p) for p in self.started) + 1
            self.max_in_flight = max(self.max_in_flight, in_flight)
            self.prompts.append((prompt_id, prefix.split("/")[-1]))
            self.started[prompt_id] = time.monotonic()
            if len(self.prompts) == self.die_on:  # answer this request, then stop listening
                threading.Thread(target=self.close, daemon=True).start()
        return {"prompt_id": prompt_id, "number": len(self.prompts), "node_errors": {}}

    def history(self, prompt_id: str) -> dict:
        with self.lock:
            if self.forget or prompt_id not in self.started or not self.finished(prompt_id):
                return {}
            job = dict(self.prompts)[prompt_id]
        video = {"filename": f"{job}_00001_.mp4", "subfolder": "phantom_batch", "type": "output"}
        return {prompt_id: {"status": {"completed": True, "status_str": "success", "messages": []},
                            "outputs": {"9": {"images": [video]}}}}

    def queue(self) -> dict:
        with self.lock:
            running = [] if self.forget else [[0, p, {}, {}, []] for p in self.started if not self.finished(p)]
        return {"queue_running": running, "queue_pending": []}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def reply(self, body: dict | bytes, status: int = 200) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = urlparse(self.path).path
                if path == "/upload/image":
                    self.reply({"name": f"{uuid.uuid4().hex[:8]}.png", "subfolder": "phantom_batch", "type": "input"})
                elif path == "/prompt":
                    self.reply(fake.on_prompt(json.loads(raw)))
                else:  # /queue (delete), /interrupt
                    self.reply({})

            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path.startswith("/history/"):
                    self.reply(fake.history(url.path.rsplit("/", 1)[-1]))
                elif url.path == "/queue":
                    self.reply(fake.queue())
                elif url.path == "/view":
                    self.reply(parse_qs(url.query)["filename"][0].encode())
                else:
                    self.reply({"error": "not found"}, 404)

        return Handler
