# ComfyUI-Phantom: every set-up step lives here and in scripts/bootstrap.sh.
PY := .venv/bin/python

.PHONY: env demo test bench bench-memory workflows
env: .venv/.phantom-ready

.venv/.phantom-ready: scripts/bootstrap.sh requirements.txt
	bash scripts/bootstrap.sh

# The main job: a Phantom video generated through a headless ComfyUI from real photos.
demo: env
	$(PY) scripts/demo.py

# Every test (core parity, nodes through a real ComfyUI server, shipped workflows end to end).
test: env
	$(PY) -m pytest tests -q -p no:cacheprovider

# Printed side-by-side ratios (not tests).
bench: env
	$(PY) benchmarks/bench_dit.py

bench-memory: env
	$(PY) benchmarks/bench_load_memory.py

workflows: env
	$(PY) tools/make_workflows.py
