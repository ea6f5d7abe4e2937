"""Model files and folders named by node inputs: what ComfyUI's model folders offer, and the one way a name
becomes a path.

ComfyUI 0.3.75 checks no combo value of a V3 node at /prompt, so a workflow can send any string as `dit_name`,
`local_model`, ... Every such name goes through `model_path` (in `execute`) and `model_error` (in
`validate_inputs`): it must be one of the names the input lists and resolve strictly inside the folder's base
paths (`phantom_core.loading.disk.resolve_inside`: no absolute path, no `..`, no symbolic link leading out).
"""

from __future__ import annotations

import os

import folder_paths

from phantom_core.loading.disk import resolve_inside
from phantom_core.loading.files import INDEX_SUFFIX

LLM_FOLDER = "LLM"
SHOWN_NAMES = 10  # names quoted in an error message

if LLM_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(LLM_FOLDER, os.path.join(folder_paths.models_dir, LLM_FOLDER))


def files_under(folder: str, suffix: str) -> list[str]:
    """Files ending in `suffix` at any depth of ComfyUI's `models/<folder>` folders, relative to their folder."""
    found = set()
    for base in folder_paths.get_folder_paths(folder):
        for root, _, files in os.walk(base, followlinks=True):
            found |= {os.path.relpath(os.path.join(root, f), base) for f in files if f.endswith(suffix)}
    return sorted(found)


def dit_files() -> list[str]:
    """ComfyUI's `models/diffusion_models` listing plus sharded checkpoints' `*.safetensors.index.json` files
    (the official 14B release is an index and 6 shards) and GGUF files (ComfyUI lists neither .json nor .gguf)."""
    listed = set(folder_paths.get_filename_list("diffusion_models"))
    return sorted(listed | set(files_under("diffusion_models", INDEX_SUFFIX)) | set(files_under("diffusion_models",
                                                                                                ".gguf")))


def tokenizer_files() -> list[str]:
    """Sentencepiece models (`*.model`) at any depth of ComfyUI's `models/text_encoders` folders, e.g. a
    downloaded `google/umt5-xxl/spiece.model`."""
    return files_under("text_encoders", ".model")


def local_model_folders() -> list[str]:
    """Names of the sub-folders of every `models/LLM` path that hold a config.json (sorted, unique)."""
    names = {name for base in folder_paths.get_folder_paths(LLM_FOLDER) if os.path.isdir(base)
             for name in os.listdir(base) if os.path.isfile(os.path.join(base, name, "config.json"))}
    return sorted(names)


LISTINGS = {  # ComfyUI model folder -> the names its inputs offer
    "diffusion_models": dit_files,
    "vae": lambda: folder_paths.get_filename_list("vae"),
    "text_encoders": lambda: folder_paths.get_filename_list("text_encoders"),
    "clip_vision": lambda: folder_paths.get_filename_list("clip_vision"),  # the MMDiT's CLIP towers
    "tokenizers": tokenizer_files,  # spiece.model files, which live in models/text_encoders
    LLM_FOLDER: local_model_folders,
}
BASE_FOLDER = {"tokenizers": "text_encoders"}  # a listing whose files live in another model folder


def model_path(listing: str, input_name: str, name: object) -> str:
    """Full path of `name`, one of the names `LISTINGS[listing]` offers, resolved inside its model folder.

    Raises ValueError naming `input_name`, the value and the valid names for a name that is not offered, is not
    a string, is absolute, holds `..` or leads out of the folder through a symbolic link.
    """
    folder = BASE_FOLDER.get(listing, listing)
    offered = LISTINGS[listing]()
    more = f", ... ({len(offered)} in all)" if len(offered) > SHOWN_NAMES else ""
    valid = ", ".join(offered[:SHOWN_NAMES]) + more if offered else "none found"
    path = resolve_inside(folder_paths.get_folder_paths(folder), name, input_name, where=f"models/{folder}",
                          valid=valid)
    is_there = path is not None and (path.is_dir() if listing == LLM_FOLDER else path.is_file())
    if name not in offered or not is_there:
        raise ValueError(f"{input_name} is {name!r}, which is not in models/{folder} (available: {valid})")
    return str(path)


def model_error(listing: str, input_name: str, name: object) -> str | None:
    """`model_path`'s message for `validate_inputs` (None when valid, or when the value is not known yet)."""
    if name is None:
        return None
    try:
        model_path(listing, input_name, name)
    except ValueError as err:
        return str(err)
    return None
