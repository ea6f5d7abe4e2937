"""Phantom-Wan and its Wan2.1 companions, with the upstream key names: the DiT (``dit``, ``rope``, ``load``), the
causal video VAE (``vae``, ``vae_blocks``, ``vae_tiling``), latent normalisation and shapes (``latents``), the
umT5 text encoder (``umt5``, ``umt5_fp8``) and what a Wan-family file is (``inspect``).

Importing any module here loads neither transformers nor sentencepiece nor imageio-ffmpeg: the text encoder
imports them where it builds a model or a tokenizer."""
