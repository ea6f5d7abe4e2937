"""LoRA for the Phantom-Wan DiT: the trainable adapter on named Linears (``adapter``), the LoRA files we write
(ComfyUI's own layout) and read (kohya / musubi, diffusion-pipe / ai-toolkit, diffusers, full-weight deltas)
(``files``, ``keys``), and applying LoRAs at a strength, merged into the weights or as adapters (``apply``)."""
