"""Files -> state dicts, knowing no network: reading checkpoints (``files``), their headers alone (``headers``),
generic key checks (``keys``) and fp8 / scaled-fp8 storage (``fp8``: cast-on-forward layers, the one table of
user-facing weight dtypes). Networks recognise and load their own keys (``phantom_core.wan.load`` ...)."""
