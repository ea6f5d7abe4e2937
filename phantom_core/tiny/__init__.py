"""The embedded default's fixtures: tiny checkpoints in the upstream key layouts (``default``), the tiny umT5's
tokenizer corpus, tokenizer training and random weights (``text``)."""
