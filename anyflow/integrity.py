"""Trust in stored weights: checksums, non-finite checks and a cheap look into a checkpoint before a run starts.

- **Checksums** (xxHash3, 128 bit, ~5 GB/s). A Lightning checkpoint file carries one over all its tensors
  (``checkpoint["anyflow"]["checksum"]``, written and checked by
  :class:`anyflow.callbacks.checkpoint.AtomicCheckpointIO`);
  an export's ``anyflow.json`` carries one per weight file (``checksums``), checked before it is loaded. Bytes
  changed on disk, which load silently otherwise, then fail with one sentence.
- **Non-finite weights** (NaN, ±inf) are never written to a checkpoint or an export, and a network that holds any
  is refused when it is loaded.
- :func:`inspect_checkpoint` reads a checkpoint's stage and iteration without its tensors (memory-mapped), so an
  empty, cut-off, foreign or code-carrying file fails in one sentence before any network is built. Loading is data
  only (``weights_only=True``): a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Iterator

import torch
import xxhash
from torch import Tensor, nn

CHUNK = 64 << 20


class IntegrityError(ValueError):
    """A stored file cannot be trusted (unreadable, cut off, corrupted, non-finite); one sentence."""


def _tensors(obj, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """``(path, tensor)`` of every tensor in nested dicts / lists / tuples, in a fixed order."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key in obj:
            yield from _tensors(obj[key], f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _tensors(item, f"{prefix}/{i}")


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_checksum(obj) -> str:
    """xxh3-128 over the names, dtypes, shapes and bytes of every tensor in ``obj``."""
    h = xxhash.xxh3_128()
    for name, t in _tensors(obj):
        t = _local(t).detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def file_checksum(path: str | Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def nonfinite_names(obj, limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) floating-point tensors in ``obj`` holding a NaN or an infinity."""
    bad = []
    for name, t in _tensors(obj):
        t = _local(t)
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name.lstrip("/"))
            if len(bad) >= limit:
                break
    return bad


def nonfinite_parameters(module: nn.Module, limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) parameters and buffers of ``module`` holding a NaN or an infinity."""
    named = dict(module.named_parameters())
    named.update({k: v for k, v in module.named_buffers() if v is not None})
    return nonfinite_names({k: v for k, v in named.items() if v.device.type != "meta"}, limit)


def load_error_gist(error: BaseException) -> str:
    """Why ``torch.load`` failed, in a few words (never the advice to unpickle code)."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in text:
        if "Unsupported operand" in text or "invalid load key" in text:
            return "it is not a PyTorch checkpoint or it is cut off"
        return "it holds pickled objects other than tensors, and loading never runs code"
    if isinstance(error, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)) or "invalid load key" in text:
        return "it is not a PyTorch checkpoint or it is cut off"
    if "central directory" in text or "zip archive" in text or "PytorchStreamReader" in text:
        return "it is cut off or corrupted"
    return (text.strip().splitlines() or [type(error).__name__])[0][:160]


def torch_load(path: str | Path, **kwargs):
    """``torch.load(weights_only=True)`` with a one-sentence :class:`IntegrityError` for any unreadable file."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise IntegrityError(f"{path} is empty; pass a complete checkpoint.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, zipfile.BadZipFile, AttributeError,
            TypeError) as error:
        if isinstance(error, RuntimeError) and kwargs.get("mmap") and "mmap" in str(error):
            return torch_load(path, **{k: v for k, v in kwargs.items() if k != "mmap"})  # an old (non-zip) file
        raise IntegrityError(f"{path} cannot be read ({load_error_gist(error)}); pass a checkpoint written by "
                             "train.py.") from None


def inspect_checkpoint(path: str | Path) -> dict:
    """``{"step", "stage"}`` of a Lightning checkpoint (a file, or an FSDP folder with ``meta.pt``), read without
    its tensors; :class:`IntegrityError` in one sentence when it is not one."""
    path = Path(path)
    meta_file = path / "meta.pt" if path.is_dir() else path
    if path.is_dir() and not meta_file.is_file():
        raise IntegrityError(f"{path} is a folder without meta.pt, not a distributed checkpoint; pass a .ckpt file "
                             "or a complete checkpoint folder.")
    checkpoint = torch_load(meta_file, mmap=True)
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
        raise IntegrityError(f"{path} is not a Lightning checkpoint (no global_step); pass a checkpoint written by "
                             "train.py.")
    info = checkpoint.get("anyflow") if isinstance(checkpoint.get("anyflow"), dict) else {}
    return {"step": int(checkpoint["global_step"]), "stage": info.get("stage")}


def verify_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """A loaded checkpoint file: its tensors match its checksum and hold finite numbers (one sentence if not)."""
    info = checkpoint.get("anyflow") if isinstance(checkpoint.get("anyflow"), dict) else {}
    expected = info.get("checksum")
    if expected is not None:
        rest = {k: v for k, v in checkpoint.items() if k != "anyflow"}
        if tensor_checksum(rest) != expected:
            raise IntegrityError(f"{path} does not match its checksum (its bytes changed on disk); resume from "
                                 "another checkpoint.")
    bad = nonfinite_names(checkpoint.get("state_dict", {}))
    if bad:
        raise IntegrityError(f"{path} holds non-finite weights ({', '.join(bad)}); resume from another checkpoint.")


__all__ = ["IntegrityError", "tensor_checksum", "file_checksum", "nonfinite_names", "nonfinite_parameters",
           "load_error_gist", "torch_load", "inspect_checkpoint", "verify_checkpoint"]
