"""Run a batch of Phantom subject-to-video jobs on running ComfyUI servers (HTTP API, `requests` only).

    python tools/phantom_batch.py jobs.jsonl --server http://127.0.0.1:8188 [--server URL ...] --out DIR

jobs.jsonl holds one JSON object per line (blank lines and lines starting with # are skipped):

    {"id": "girl", "refs": ["ref1.jpg"], "prompt": "...", "negative_prompt": "...", "seed": 42,
     "width": 832, "height": 480, "frames": 81, "steps": 50, "shift": 5.0, "solver": "unipc",
     "w_img": 5.0, "w_text": 7.5, "fps": 16, "mode": "letterbox", "preset": "custom",
     "dit_name": "Phantom-Wan-1.3B.pth", "vae_name": "Wan2.1_VAE.pth", "text_encoder_name": "umt5_xxl_fp16.safetensors"}

Only `refs` (1 to 4 image paths, relative to the JSONL's folder) and `prompt` are required; the rest default to
the workflow's (its model files are the tiny embedded default: name real ones per job or with --dit / --vae /
--text-encoder). Every field is type-checked (`JOB_FIELDS`), each `id` must be unique (it names the MP4); a bad
line fails alone, with its line number. Each server runs one job at a time and the next job goes to the first free
one: images uploaded (/upload/image), the API workflow (example_workflows/api/phantom_4ref_api.json, unused
references removed) queued (/prompt), followed (/history, /queue), its MP4s downloaded (/view) into DIR. A failed
job (refused, an execution error, a timeout) is reported and the others go on; a job whose server is lost (refused
or reset connection, HTTP timeout, the prompt vanished) is retried on another (--retries), the lost server retired.
DIR/manifest.json records each job's status, server, retries, outputs and error. Exit status 1 if any job failed.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import logging
import os
import re
import sys
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKFLOW = ROOT / "example_workflows" / "api" / "phantom_4ref_api.json"
SAMPLER_KEYS = ("width", "height", "frames", "steps", "shift", "solver", "w_img", "w_text", "seed", "preset")
MODEL_KEYS = {"dit_name": "PhantomDiTLoader", "vae_name": "PhantomVAELoader",
              "text_encoder_name": "PhantomTextEncoderLoader"}  # job key -> the loader node whose input it sets
UPLOAD_SUBFOLDER = "phantom_batch"
DEFAULT_SERVER = "http://127.0.0.1:8188"

log = logging.getLogger("phantom.batch")


class JobError(Exception):
    """A job failed; the message is what the manifest records."""


class ServerLost(Exception):
    """A server forgot a queued prompt (it restarted). It, a refused or reset connection and an HTTP timeout
    (`SERVER_LOST`) make a server count as lost: its job is retried elsewhere."""


SERVER_LOST = (ServerLost, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


# job key -> (accepted types, what is valid): every field of a line is checked before anything is sent
TEXT, INTEGER, NUMBER = (str,), (int,), (int, float)
JOB_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "id": (TEXT, "a name of letters, digits, '_', '.', '-' (it names the output file)"),
    "refs": ((list,), 'a list of 1 to 4 image paths, e.g. ["a.png"] (relative to the JSONL\'s folder)'),
    "prompt": (TEXT, "a non-empty string"),
    "negative_prompt": (TEXT, "a string"),
    **dict.fromkeys(("width", "height", "frames", "steps", "seed", "quality"), (INTEGER, "an integer")),
    **dict.fromkeys(("shift", "w_img", "w_text", "fps"), (NUMBER, "a number")),
    **dict.fromkeys(("solver", "mode", "preset", *MODEL_KEYS), (TEXT, "a string")),
}
JOB_KEYS = set(JOB_FIELDS)


def read_jobs(path: Path, defaults: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Parse and check the JSONL; reference paths are resolved against its folder; `defaults` fill keys a job
    leaves out. Each job gets `line`, its line number.

    A line that fails (not a JSON object, a field of the wrong type, a missing reference file, an `id` already
    used by an earlier line) becomes a job with an `error` naming the file, the line and the field; the others
    run.
    """
    jobs: list[dict[str, Any]] = []
    used: dict[str, int] = {}  # id -> the line that has it
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        job: Any = None
        try:
            try:
                job = json.loads(line)
            except json.JSONDecodeError as e:
                raise JobError(f"not valid JSON ({e})") from None
            if not isinstance(job, dict):
                raise JobError(f"expected a JSON object, got {type(job).__name__}")
            job = (defaults or {}) | job
            job.setdefault("id", f"job{len(jobs) + 1:03d}")
            check_job(job)
            if job["id"] in used:
                raise JobError(f"id {job['id']!r} is already used by line {used[job['id']]}; each job needs its "
                               "own id (it names the output file)")
            used[job["id"]] = number
            job["refs"] = [str((path.parent / r).resolve()) for r in job["refs"]]
            if missing := [r for r in job["refs"] if not Path(r).is_file()]:
                raise JobError(f"refs: file(s) not found: {missing}")
        except JobError as e:
            name = job.get("id") if isinstance(job, dict) and isinstance(job.get("id"), str) else f"line{number}"
            job = {"id": name, "refs": [], "error": f"{path.name}:{number}: {e}"}
        jobs.append(job | {"line": number})
    return jobs


def check_job(job: dict[str, Any]) -> None:
    """Check every field of one job line (types, the id's spelling, 1 to 4 references); raises JobError naming
    the field. Value ranges (frames 4k+1, sizes, ...) are the server's to check: /prompt refuses them by name."""
    if unknown := set(job) - JOB_KEYS:
        raise JobError(f"unknown job keys {sorted(unknown)}; valid: {sorted(JOB_KEYS)}")
    for key, value in job.items():
        types, valid = JOB_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise JobError(f"{key}: got {type(value).__name__} {value!r}; expected {valid}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", job["id"]):
        raise JobError(f"id: got {job['id']!r}; use letters, digits, '_', '.', '-' (it names the output file)")
    if not job.get("prompt", "").strip():
        raise JobError("prompt: a non-empty string is required")
    refs = job.get("refs", [])
    if not 1 <= len(refs) <= 4 or not all(isinstance(r, str) and r.strip() for r in refs):
        raise JobError(f"refs: got {refs!r}; expected {JOB_FIELDS['refs'][1]}")


def node_of(prompt: dict, class_type: str) -> str:
    """The id of the one node of `class_type` in an API workflow."""
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    if len(ids) != 1:
        raise JobError(f"workflow must hold exactly one {class_type} node, found {len(ids)}")
    return ids[0]


def fill_workflow(template: dict, job: dict[str, Any], images: list[str]) -> dict:
    """The API workflow for one job: uploaded image names, prompt texts and settings filled in."""
    prompt = copy.deepcopy(template)
    refs_id = node_of(prompt, "PhantomReferences")
    sampler_id = node_of(prompt, "PhantomSampler")
    # 1. references: keep image_1..image_n (their LoadImage nodes), drop the rest with their masks
    inputs = prompt[refs_id]["inputs"]
    for k in range(1, 5):
        link = inputs.get(f"image_{k}")
        if k <= len(images):
            if link is None:
                raise JobError(f"workflow's PhantomReferences has no image_{k} input for reference {k}")
            prompt[link[0]]["inputs"]["image"] = images[k - 1]
        elif link is not None:
            del inputs[f"image_{k}"]
            if inputs.get(f"mask_{k}", [None])[0] == link[0]:
                del inputs[f"mask_{k}"]
            prompt.pop(link[0], None)
    # 2. texts: the PhantomTextEncode nodes wired to the sampler's positive / negative
    for socket, key in (("positive", "prompt"), ("negative", "negative_prompt")):
        if key in job:
            prompt[prompt[sampler_id]["inputs"][socket][0]]["inputs"]["text"] = job[key]
    # 3. settings
    prompt[sampler_id]["inputs"] |= {k: job[k] for k in SAMPLER_KEYS if k in job}
    prompt[node_of(prompt, "PhantomEncodeReferences")]["inputs"] |= {k: job[k] for k in ("width", "height") if k in job}
    if "mode" in job:
        prompt[refs_id]["inputs"]["mode"] = job["mode"]
    for key, loader in MODEL_KEYS.items():
        if key in job:
            prompt[node_of(prompt, loader)]["inputs"][key] = job[key]
    save = prompt[node_of(prompt, "PhantomSaveVideo")]["inputs"]
    save |= {k: job[k] for k in ("fps", "quality") if k in job}
    save["filename_prefix"] = f"phantom_batch/{job['id']}"
    return prompt


class Client:
    """The few ComfyUI HTTP endpoints the batch needs."""

    def __init__(self, server: str, timeout_s: float = 60.0) -> None:
        self.server, self.timeout_s, self.client_id = server.rstrip("/"), timeout_s, uuid.uuid4().hex

    def upload(self, path: str) -> str:
        """Upload an image to input/phantom_batch/ (same content is reused); returns LoadImage's value."""
        with open(path, "rb") as f:
            r = requests.post(f"{self.server}/upload/image", files={"image": (Path(path).name, f)},
                              data={"subfolder": UPLOAD_SUBFOLDER, "type": "input"}, timeout=self.timeout_s)
        if not r.ok:
            raise JobError(f"upload of {path} failed: HTTP {r.status_code} {r.text[:300]}")
        body = r.json()
        return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id, or raises JobError with the server's validation errors."""
        r = requests.post(f"{self.server}/prompt", json={"prompt": prompt, "client_id": self.client_id},
                          timeout=self.timeout_s)
        if r.status_code == 200:
            return r.json()["prompt_id"]
        raise JobError(f"refused by /prompt (HTTP {r.status_code}): {describe_refusal(r)}")

    def history(self, prompt_id: str) -> dict | None:
        r = requests.get(f"{self.server}/history/{prompt_id}", timeout=self.timeout_s)
        r.raise_for_status()
        return r.json().get(prompt_id)

    def queue_state(self, prompt_id: str) -> str:
        """'running', 'pending (n ahead)' or 'unknown' for a queued prompt."""
        q = requests.get(f"{self.server}/queue", timeout=self.timeout_s).json()
        if any(item[1] == prompt_id for item in q.get("queue_running", [])):
            return "running"
        for ahead, item in enumerate(sorted(q.get("queue_pending", []), key=lambda item: item[0])):
            if item[1] == prompt_id:
                return f"pending ({ahead + len(q.get('queue_running', []))} ahead)"
        return "unknown"

    def cancel(self, prompt_id: str) -> None:
        """Drop a prompt from the queue, or interrupt it if it is the one running."""
        state = self.queue_state(prompt_id)
        requests.post(f"{self.server}/queue", json={"delete": [prompt_id]}, timeout=self.timeout_s)
        if state == "running":
            requests.post(f"{self.server}/interrupt", json={"prompt_id": prompt_id}, timeout=self.timeout_s)

    def download(self, result: dict, target: Path) -> Path:
        """GET /view for one output file, written atomically to `target`."""
        params = {k: result.get(k, "") for k in ("filename", "subfolder", "type")}
        r = requests.get(f"{self.server}/view", params=params, timeout=self.timeout_s)
        if not r.ok:
            raise JobError(f"download of {params['filename']} failed: HTTP {r.status_code}")
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(r.content)
        os.replace(tmp, target)
        return target


def describe_refusal(r: requests.Response) -> str:
    """One line from /prompt's 400 body: the error and each node's errors (which name the input)."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    parts = [body.get("error", {}).get("message", "")]
    for node_id, info in (body.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            parts.append(f"node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "; ".join(p for p in parts if p)


def execution_error(entry: dict) -> str:
    """The execution_error(s) of a history entry as one line."""
    errors = [f"{d.get('node_type')} (node {d.get('node_id')}): {d.get('exception_message', '').strip()}"
              for kind, d in entry.get("status", {}).get("messages", []) if kind == "execution_error"]
    return "; ".join(errors) or "execution failed (no execution_error message)"


def follow(client: Client, prompt_id: str, timeout_s: float, poll_s: float, label: str) -> dict:
    """Poll until the prompt's history entry is complete; JobError on execution error or timeout; ServerLost when
    the prompt is in neither /history nor /queue on two polls in a row (the server restarted and lost its queue;
    one such poll may be a prompt that finished between the two requests)."""
    deadline, last_state, missing = time.monotonic() + timeout_s, None, 0
    while time.monotonic() < deadline:
        entry = client.history(prompt_id)
        if entry is not None and entry.get("status", {}).get("completed") is not None:
            if entry["status"].get("status_str") == "error":
                raise JobError(f"execution error: {execution_error(entry)}")
            return entry
        state = client.queue_state(prompt_id)
        missing = missing + 1 if entry is None and state == "unknown" else 0
        if missing == 2:
            raise ServerLost(f"prompt {prompt_id} vanished (in neither /history nor /queue)")
        if state != last_state:
            log.info("%s: %s", label, state)
            last_state = state
        time.sleep(poll_s)
    client.cancel(prompt_id)
    raise JobError(f"timeout: not finished after {timeout_s:.0f} s (removed from the queue)")


def videos_of(entry: dict) -> list[dict]:
    """Output file records (filename/subfolder/type) of the MP4s a finished prompt produced."""
    return [item for node in entry.get("outputs", {}).values() for item in node.get("images", [])
            if isinstance(item, dict) and str(item.get("filename", "")).endswith(".mp4")]


def run_job(client: Client, template: dict, job: dict, record: dict, out_dir: Path, timeout_s: float,
            poll_s: float) -> None:
    """Upload, queue, follow and download one job on one server, filling `record` (prompt_id, outputs)."""
    images = [client.upload(path) for path in job["refs"]]
    record["prompt_id"] = client.queue(fill_workflow(template, job, images))
    log.info("job %s: queued on %s as %s", job["id"], client.server, record["prompt_id"])
    entry = follow(client, record["prompt_id"], timeout_s, poll_s, f"job {job['id']} on {client.server}")
    if not (videos := videos_of(entry)):
        raise JobError("finished without an MP4 output")
    suffixes = [""] if len(videos) == 1 else [f"_{k + 1}" for k in range(len(videos))]
    record["outputs"] = [str(client.download(v, out_dir / f"{job['id']}{x}.mp4")) for v, x in zip(videos, suffixes)]


def attempt(client: Client, template: dict, job: dict, record: dict, out_dir: Path, timeout_s: float,
            poll_s: float) -> bool:
    """Run `job` on `client`'s server, the outcome in `record`; True when the server was lost (`SERVER_LOST`): the
    loss is listed in `record["retries"]` and the job stays pending."""
    start = time.monotonic()
    try:
        run_job(client, template, job, record, out_dir, timeout_s, poll_s)
        record |= {"status": "ok", "server": client.server}
        log.info("job %s: done on %s in %.1f s -> %s", job["id"], client.server, time.monotonic() - start,
                 record["outputs"])
    except SERVER_LOST as e:
        record["retries"].append({"server": client.server, "error": f"{type(e).__name__}: {e}"})
        log.error("job %s: server %s lost (%s); it takes no more jobs", job["id"], client.server, e)
        return True
    except (JobError, requests.RequestException) as e:
        record |= {"status": "failed", "server": client.server, "error": str(e)}
        log.error("job %s on %s: %s", job["id"], client.server, e)
    finally:
        record["seconds"] = round(time.monotonic() - start, 2)
    return False


def run_batch(jobs: list[dict], clients: list[Client], template: dict, out_dir: Path, timeout_s: float,
              poll_s: float = 1.0, retries: int = 2) -> list[dict]:
    """Run the jobs over the servers, one job in flight per server (a thread each), the next waiting job going to
    the first free server; a lost server takes no more jobs and its job goes back to the front of the queue, at most
    `retries` times. Returns one manifest record per job, in the jobs' order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [{"id": job["id"], "line": job.get("line"), "refs": job["refs"], "prompt": job.get("prompt"),
                "status": "failed" if "error" in job else "pending", "server": None, "outputs": [],
                "error": job.get("error"), "retries": []} for job in jobs]  # "error": read_jobs refused the line
    for record in (r for r in records if r["error"]):
        log.error("job %s: %s", record["id"], record["error"])
    waiting = collections.deque(i for i, record in enumerate(records) if record["status"] == "pending")
    free, running = list(clients), {}  # free servers in the order they became free; future -> (client, job index)
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        while running or (waiting and free):
            while waiting and free:
                client, index = free.pop(0), waiting.popleft()
                running[pool.submit(attempt, client, template, jobs[index], records[index], out_dir, timeout_s,
                                    poll_s)] = (client, index)
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                client, index = running.pop(future)
                if not future.result():  # True: the server was lost, it takes no more jobs
                    free.append(client)
                elif len(records[index]["retries"]) <= retries:
                    waiting.appendleft(index)
    for record in (r for r in records if r["status"] == "pending"):  # retries or servers ran out
        lost = "; ".join(f"{r['server']} ({r['error']})" for r in record["retries"])
        error = f"server lost on each of {len(record['retries'])} tries: {lost}" if lost else "not run: no server left"
        record |= {"status": "failed", "error": error}
    return records


def write_manifest(path: Path, servers: list[str], records: list[dict]) -> None:
    """manifest.json: the servers, counts and one record per job (written atomically)."""
    body = {"servers": servers, "ok": sum(r["status"] == "ok" for r in records),
            "failed": sum(r["status"] != "ok" for r in records), "jobs": records}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", type=Path, help="JSONL file, one job per line")
    parser.add_argument("--server", action="append", metavar="URL",
                        help=f"ComfyUI address (default {DEFAULT_SERVER}); repeat it to spread the jobs over several "
                             "servers, one job at a time on each")
    parser.add_argument("--out", type=Path, required=True, help="folder for the MP4s and manifest.json")
    parser.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="API-format workflow template")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per job once it is followed")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between /history polls")
    parser.add_argument("--retries", type=int, default=2, help="times a job is retried after its server is lost")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds per HTTP request before its "
                                                                            "server counts as lost")
    parser.add_argument("--dit", metavar="NAME", help="dit_name for jobs that name none (a file in the server's "
                                                      "models/diffusion_models, e.g. Phantom-Wan-1.3B.pth)")
    parser.add_argument("--vae", metavar="NAME", help="vae_name for jobs that name none (models/vae)")
    parser.add_argument("--text-encoder", metavar="NAME",
                        help="text_encoder_name for jobs that name none (models/text_encoders)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        defaults = {key: value for key, value in (("dit_name", args.dit), ("vae_name", args.vae),
                                                  ("text_encoder_name", args.text_encoder)) if value}
        jobs = read_jobs(args.jobs, defaults)
        template = json.loads(args.workflow.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.error("%s", e)
        return 2
    servers = list(dict.fromkeys(args.server or [DEFAULT_SERVER]))  # each once: one job in flight per server
    clients = [Client(server, args.request_timeout) for server in servers]
    records = run_batch(jobs, clients, template, args.out, args.timeout, args.poll, max(0, args.retries))
    write_manifest(args.out / "manifest.json", servers, records)
    failed = [r["id"] for r in records if r["status"] != "ok"]
    log.info("%d of %d jobs ok%s", len(records) - len(failed), len(records),
             f"; failed: {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
