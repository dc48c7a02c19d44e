"""
Files that a crash or a full disk never leaves torn: written beside their place, flushed, then renamed over it
(write_atomically), and a full disk or a refused folder said in one line (unwritable). Checkpoints (checkpoint.py,
sharded_checkpoint.py) and the run log (runlog.py) write through it.
"""

import os
import errno
import shutil

import torch

from errors import UserError


def write_atomically(path, write):
    """write(f) into path.tmp (a binary file), flushed to disk, then renamed over `path`, the rename made durable:
    a crash at any moment leaves the old file or the new one. A failed write leaves no path.tmp behind."""
    tmp_path = f"{path}.tmp"
    try:
        with open(tmp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_folder(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def fsync_folder(path):
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tensor_bytes(value) -> int:
    """The bytes of the tensors in a nest of dicts, lists and tuples: what a checkpoint of them needs on disk."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def unwritable(path: str, error: OSError, needed: int) -> UserError:
    """A full disk or a refused folder while writing `path`, said in one line. Any other OSError is a bug: re-raised."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG):
        raise error
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    return UserError(f"could not write {path}: {error.strerror} (it needs about {needed / 2**20:,.1f} MiB, "
                     f"{free / 2**20:,.1f} MiB free there); free some space or choose another --out_dir, "
                     f"then resume with --init_from=resume")



SHARDED_INDEX_NAME = "checkpoint.json"  # a folder of shards is current once this file, switched atomically, names it
