"""The two rules for touching the disk: a name a user gives stays inside its folder, and a file appears whole.

``resolve_inside(bases, name, input_name)``: every file or folder name that reaches the project from a user
(a node's model combo, the rephraser's local model folder, a LoRA or dataset name) is resolved strictly inside
one of its base folders (e.g. ComfyUI's ``models/vae`` paths). Refused, with a ``ValueError`` naming the input,
the value and what is valid: an empty name, an absolute path, a ``..`` part, a NUL byte, and a path whose
symbolic links lead outside every base folder (resolved with ``os.path.realpath``, then checked for containment).
A model that lives on another disk is added as a base folder (ComfyUI's ``extra_model_paths.yaml``), not linked in.

``atomic_write(path)``: a temporary file beside ``path`` that is renamed onto it (``os.replace``) only when the
writer finished; on any error it is deleted, so no half-written file is ever seen under ``path``. The temporary
file is created with ``os.open(..., 0o666)``, so the kernel applies the process umask exactly as for a plain
``open(path, "w")`` (0o644 under umask 022, 0o600 under 077), and that mode is set again before the rename, since
some writers recreate the file themselves (safetensors' ``save_file`` and ``tempfile.mkstemp`` make 0o600). Reading
the umask this way needs no ``os.umask`` call, which would race with other threads (ComfyUI runs several).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

NEW_FILE_MODE = 0o666  # what open(path, "w") asks for; the kernel removes the umask's bits


def _name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a relative name inside a folder, or None when its spelling is acceptable."""
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a file name"
    if not name.strip():
        return "it is empty"
    if "\x00" in name:
        return "it holds a NUL character"
    if os.path.isabs(name) or name.startswith(("/", "\\")) or os.path.splitdrive(name)[0]:
        return "it is an absolute path; give a name relative to the folder"
    if ".." in name.replace("\\", "/").split("/"):
        return "it holds a '..' part, which leaves the folder"
    return None


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def resolve_inside(bases: Sequence[str | os.PathLike], name: str, input_name: str, *, where: str,
                   valid: str = "") -> Path | None:
    """The path of ``name`` under the first of ``bases`` where it exists, checked to stay inside ``bases``.

    Args:
        bases: the base folders, in search order (e.g. every configured ``models/vae``); missing ones are skipped.
        name: a relative file or folder name as the user gave it (``"sub/model.safetensors"``).
        input_name: the input's name for messages (``"vae_name"``, ``"--lora"``).
        where: the folder as the user knows it, for messages (``"models/vae"``).
        valid: what is valid, appended to messages (e.g. the listed names).
    Returns:
        The resolved (symlink-free) absolute path, or None when ``name`` is acceptable but exists under no base.
    Raises:
        ValueError: naming ``input_name``, the value and ``where`` for a non-string, empty, absolute or ``..``
            name, or one whose symbolic links resolve outside every base folder.
    """
    hint = f" (valid: {valid})" if valid else ""
    if (problem := _name_problem(name)) is not None:
        raise ValueError(f"{input_name} is {name!r}: {problem}; it must name something in {where}{hint}")
    roots = [os.path.realpath(b) for b in bases if os.path.isdir(b)]
    for root in roots:
        candidate = os.path.join(root, name)
        if not os.path.lexists(candidate):
            continue
        resolved = os.path.realpath(candidate)
        if not any(_inside(resolved, r) for r in roots):
            raise ValueError(f"{input_name} is {name!r}, a symbolic link that leads outside {where} (to {resolved}); "
                             f"add that folder to ComfyUI's extra_model_paths.yaml instead of linking it{hint}")
        return Path(resolved)
    return None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a new, empty temporary file beside ``path`` to write; rename it onto ``path`` when the block ends.

    The temporary name is ``.<name>.<random><suffix>`` in the destination's folder (created if missing), so the
    rename stays on one file system; ``suffix`` keeps an extension a writer needs (ffmpeg picks the container
    from ``.mp4``). Mode: 0o666 minus the umask, as a plain ``open(path, "w")`` gives. If the block raises, the
    temporary file is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
            break
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    try:
        mode = os.fstat(fd).st_mode & 0o777  # 0o666 minus the umask, as the kernel applied it
        os.close(fd)
        yield tmp
        os.chmod(tmp, mode)  # a writer that recreated the file (safetensors makes 0o600) gets it back
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
