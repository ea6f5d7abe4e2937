"""ComfyUI-Phantom: the ComfyUI entry point (V3 extension API only).

ComfyUI imports this file as a package from `custom_nodes/`. The repository directory is put on `sys.path` so
the nodes can import the core as `phantom_core`; it is appended (not prepended) so that our `nodes/` package
never shadows ComfyUI's own `nodes` module. No NODE_CLASS_MAPPINGS here: it would silently win over V3.
Nothing of ComfyUI is imported at module level, so this file also imports cleanly without it (pytest imports
it as the package of the repository root).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from comfy_api.latest import ComfyExtension

_REPO_DIR = os.path.dirname(os.path.abspath(__file__))
if _REPO_DIR not in sys.path:
    sys.path.append(_REPO_DIR)


async def comfy_entrypoint() -> ComfyExtension:
    """ComfyUI's V3 hook: the extension listing every Phantom node."""
    from comfy_api.latest import ComfyExtension, io

    from .nodes import PHANTOM_NODES

    class PhantomExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(PHANTOM_NODES)

    return PhantomExtension()
