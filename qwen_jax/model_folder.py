"""What both the Hugging Face reader (`hf/safetensors_io.py`) and the checkpoint side files (`checkpoint_format.py`)
need to know about a model folder: its error type and which files may be read through symlinks.

A leaf module (standard library only) so that neither of the two has to import the other.
"""

from __future__ import annotations

import os


class CheckpointError(ValueError):
    """Missing, unexpected or mis-shaped tensors, unreadable files: the message lists them all."""


def inside_model_folder(folder: str, name: str, named_by: str | None = None) -> str:
    """The real path of `folder/name`, which must lie inside the folder or in its Hugging Face cache blobs.

    A file of a model folder may be a symlink (the Hugging Face cache stores
    ``snapshots/<rev>/file -> ../../blobs/<hash>``), but one that resolves anywhere else would
    make a conversion or an export copy whatever it points to: that is an error naming the file
    and its target (and the index that named it).
    """
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    root = os.path.realpath(folder)
    allowed = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":  # <repo>/snapshots/<rev>: blobs in <repo>/blobs
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    if not any(os.path.commonpath([real, a]) == a for a in allowed):
        what = f"{named_by}: shard {path}" if named_by else path
        raise CheckpointError(f"{what} resolves to {real}, outside the model folder and outside a "
                              "Hugging Face cache blob folder; copy the file into the folder instead of linking it")
    return real
