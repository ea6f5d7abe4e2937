# ComfyUI-Phantom: every set-up step lives here and in tools/bootstrap.sh.
PY := .venv/bin/python

.PHONY: env demo test lint bench bench-memory bench-train workflows
env: .venv/.phantom-ready

.venv/.phantom-ready: tools/bootstrap.sh requirements.txt
	bash tools/bootstrap.sh

# The main job: a Phantom video generated through a headless ComfyUI from real photos.
demo: env
	$(PY) -m tools.demo

# Every test (core parity, nodes through a real ComfyUI server, shipped workflows end to end).
test: env
	$(PY) -m pytest -q

# Style and static checks (pyproject.toml [tool.ruff]).
lint: env
	$(PY) -m ruff check .

# Printed side-by-side ratios (not tests); ComfyUI's code is the baseline, so it goes on the path.
bench: env
	PYTHONPATH=.comfyui $(PY) -m benchmarks.bench_dit

bench-memory: env
	$(PY) -m benchmarks.bench_load_memory

bench-train: env
	$(PY) -m benchmarks.bench_train

workflows: env
	$(PY) -m tools.make_workflows
