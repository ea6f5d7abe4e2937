"""ComfyUI-Phantom tests: core/ (phantom_core alone), nodes/ and workflows/ (a real headless ComfyUI),
support/ (helpers)."""
