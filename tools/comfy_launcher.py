"""A real ComfyUI server, started headless on the CPU with ComfyUI-Phantom installed (used by `make demo` and
the tests).

`ComfyServer(base).start()` lays out a ComfyUI base directory

    <base>/custom_nodes/ComfyUI-Phantom -> symlink to this repository
    <base>/models/{diffusion_models,vae,text_encoders}/phantom_{tiny,world}_*.safetensors (random tiny, trained)
    <base>/models/{diffusion_models,clip_vision}/phantom_world_{mmdit,clip}.safetensors (the MMDiT default, once
                                                                                         it is shipped)
    <base>/input/phantom_*.jpg   (the example reference photos of example_inputs/, which the workflows name)
    <base>/input/phantom_world_lora/   (the example training dataset of example_inputs/, which the training
                                       workflow names)
    <base>/output/

launches `.comfyui/main.py --cpu --listen 127.0.0.1 --port <free> --base-directory <base> --disable-auto-launch
--disable-api-nodes`, and waits for `/object_info`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR = ROOT / ".comfyui"
PYTHON = ROOT / ".venv" / "bin" / "python"
STARTUP_TIMEOUT_S = 240.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """One headless ComfyUI process on the CPU and the small HTTP helpers the tests need."""

    def __init__(self, base: Path | None = None, cleanup: bool = True) -> None:
        """`base`: the ComfyUI base directory (default: a new temporary one); `cleanup`: delete it on stop()."""
        self.base = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="phantom-comfy-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.cleanup = cleanup
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.proc: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Lay out custom_nodes/, models/ (tiny + trained defaults), input/ (with the example photos and datasets) and
        output/ under the base directory. An example already in input/ is kept as it is."""
        from phantom_core.tiny.default import (
            install_trained_default,
            install_trained_mmdit_default,
            trained_mmdit_shipped,
            write_tiny_default,
        )
        from tools.make_workflows import INPUTS_DIR

        link = self.base / "custom_nodes" / "ComfyUI-Phantom"
        link.parent.mkdir(exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(ROOT, target_is_directory=True)
        write_tiny_default(self.base / "models")
        install_trained_default(self.base / "models")
        if trained_mmdit_shipped():  # `make train-default-mmdit`: its workflow runs
            install_trained_mmdit_default(self.base / "models")
        for sub in ("input", "output", "temp", "user"):
            (self.base / sub).mkdir(exist_ok=True)
        for photo in INPUTS_DIR.glob("*.jpg"):
            if not (self.base / "input" / photo.name).exists():
                shutil.copyfile(photo, self.base / "input" / photo.name)
        for dataset in (p for p in INPUTS_DIR.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (self.base / "input" / dataset.name).exists():
                shutil.copytree(dataset, self.base / "input" / dataset.name)

    def start(self) -> ComfyServer:
        """Prepare the base directory, launch the server and wait until `/object_info` answers."""
        self.prepare()
        cmd = [str(PYTHON), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--disable-api-nodes",
               "--preview-method", "latent2rgb"]  # exercises PhantomSampler's step previews
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during startup:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/object_info", timeout=5).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"ComfyUI did not answer /object_info within {STARTUP_TIMEOUT_S:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        """Terminate the server (kill after 20 s) and, with `cleanup`, delete the base directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if self.cleanup:
            shutil.rmtree(self.base, ignore_errors=True)

    def log(self, tail_chars: int = 6000) -> str:
        """The last `tail_chars` characters of the server's stdout+stderr."""
        return self.log_path.read_text(errors="replace")[-tail_chars:] if self.log_path.exists() else ""

    # -- HTTP helpers ----------------------------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def object_info(self) -> dict:
        return requests.get(f"{self.url}/object_info", timeout=30).json()

    def upload_image(self, path: Path) -> str:
        """Upload a file to input/ with /upload/image; returns the name to give LoadImage."""
        with open(path, "rb") as f:
            r = requests.post(f"{self.url}/upload/image", files={"image": (path.name, f)},
                              data={"overwrite": "true"}, timeout=30)
        r.raise_for_status()
        return r.json()["name"]

    def queue(self, prompt: dict, client_id: str | None = None) -> requests.Response:
        """POST /prompt; the caller inspects status (200 or 400 with node_errors)."""
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        return requests.post(f"{self.url}/prompt", json=body, timeout=30)

    def wait(self, prompt_id: str, timeout_s: float = 300.0) -> dict:
        """Poll /history/{id} until the prompt finished; returns its history entry."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            history = requests.get(f"{self.url}/history/{prompt_id}", timeout=30).json()
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout_s:.0f} s:\n{self.log()}")

    def run(self, prompt: dict, timeout_s: float = 300.0) -> dict:
        """Queue `prompt`, assert /prompt accepted it, and wait for its history entry."""
        r = self.queue(prompt)
        assert r.status_code == 200, f"/prompt refused the workflow: {json.dumps(r.json(), indent=1)[:3000]}"
        return self.wait(r.json()["prompt_id"], timeout_s)

    def output_files(self) -> set[Path]:
        return {p for p in self.output_dir.rglob("*") if p.is_file()}
