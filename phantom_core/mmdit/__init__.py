"""The Phantom paper's own network (arXiv 2502.11079), self-contained: an SD3-style dual-stream MMDiT over video
latents (``config``, ``blocks``, ``model``) with 3-D window attention and dynamic injection of the references into
every window (``windows``), its input checks (``inputs``), checkpoints (``load``), and the CLIP reference features
through open_clip (``clip``, ``clip_keys``).

Importing any module here loads neither transformers nor open_clip: the CLIP modules import open_clip where they
build a vision tower.
"""
