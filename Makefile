# ComfyUI-Phantom: every set-up step lives here and in tools/bootstrap.sh.
PY := .venv/bin/python

.PHONY: env demo test test-browser lint bench bench-sampling bench-cache bench-memory bench-train bench-attention workflows \
	thumbnails emoji-font \
	train-default train-default-mmdit
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

bench-sampling: env
	PYTHONPATH=.comfyui $(PY) -m benchmarks.bench_sampling

# Forward time per attention back-end (sdpa, flash, sage where installed) and with compiled blocks (GPU: --device cuda).
bench-attention: env
	$(PY) -m benchmarks.bench_attention --compile

# The step cache and image-guidance window: DiT evaluations saved against quality, on the trained default.
bench-cache: env
	$(PY) -m benchmarks.bench_cache_quality --out docs/speed_quality.png --json docs/speed_quality.json --md docs/speed_quality.md

bench-memory: env
	$(PY) -m benchmarks.bench_load_memory

# Step time and peak memory of a LoRA against a full fine-tune training step (benchmarks/bench_train.py).
bench-train: env
	$(PY) -m benchmarks.bench_train

# The shipped workflows (example_workflows/*.json, api/*.json) from their one description.
workflows: env
	$(PY) -m tools.make_workflows

# The Templates browser's thumbnails (example_workflows/*.jpg): a frame of each workflow's own output.
thumbnails: env
	$(PY) -m tools.make_thumbnails

# The workflows in ComfyUI's real frontend, in headless Chromium (not part of `make test`: CI has no browser).
# Installs Debian's chromium + chromium-driver (apt-get, as root or through sudo) and selenium into .venv if missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: env
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; fi
	@$(PY) -c "import selenium" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check -q -r requirements-browser.txt
	$(PY) -m tools.browser_check

# The miniature world's emoji subjects: Debian's fonts-noto-color-emoji (PHANTOM_EMOJI_FONT overrides the path).
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
emoji-font:
	@font="$${PHANTOM_EMOJI_FONT:-$(EMOJI_FONT)}"; \
	if [ -f "$$font" ]; then echo "emoji font: $$font"; \
	else echo "emoji font missing: installing fonts-noto-color-emoji with apt-get"; \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y fonts-noto-color-emoji; fi

# The trained embedded default (phantom_core/tiny/trained/, its MODEL_CARD.md), from scratch in the miniature world:
# resumable (run it again after an interruption), deterministic on the same machine; about 75 min on 2 CPU cores.
train-default: env emoji-font
	$(PY) -m tools.train_default --work build/default

# The second embedded default, the paper's MMDiT trained in the same world (phantom_core.world.mmdit_default): the
# world CLIP, the references' CLIP features, the MMDiT (VAE and CLIP references) on train-default's latents, its motion
# stages (tools.motion_run: a one-subject cache whose subjects travel farther, pooled vectors, a cool-down with EMA,
# then the same on one- and two-subject scenes mixed), a VAE of its own (recipe subjects) and a fine-tune on that
# VAE's latents, then its export with that VAE beside the Phantom-Wan default's umT5 (refused unless byte-identical,
# which running train-default first on the same folder ensures); resumable like train-default. About 7.5 hours on two
# cores. Runs with --model default-mmdit.
train-default-mmdit: train-default
	$(PY) -m tools.train_default --work build/default --model mmdit --variant both
