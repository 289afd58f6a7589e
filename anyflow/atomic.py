"""Atomic writes of files and folders: a reader (or a later run) sees the old version or the new one, never a part.

A new version is written to a hidden sibling ``.<name>.tmp-<host>-<pid>`` on the same filesystem as the target,
flushed to disk (``fsync`` of every file and of the folder), then moved over the target:

- a file with ``os.replace`` (POSIX ``rename``: atomic within a filesystem);
- a folder, which ``rename`` cannot put over a non-empty folder, by exchanging the two names in one step
  (Linux ``renameat2(RENAME_EXCHANGE)``, ext4 / xfs / btrfs / tmpfs / overlayfs), so that ``export/`` always exists;
  where the filesystem lacks the exchange (e.g. NFS) by two renames, ``target → .<name>.old-…`` then
  ``tmp → target``. A process killed between those two leaves both siblings complete, and :func:`clean_stale` puts
  the newer one back in place.

Nothing is written to ``$TMPDIR``. A write that fails (e.g. ``ENOSPC``, a full disk) removes its temporary sibling,
keeps the previous version and raises :class:`WriteError` (one sentence). Siblings of a killed process
(``kill -KILL``) are removed by :func:`clean_stale`, which runs before the next write of the same target and when a
later run starts.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)$")
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


class WriteError(OSError):
    """Writing a checkpoint or an export failed; the previous version is intact (one sentence)."""


def sibling(target: str | Path, kind: str = "tmp") -> Path:
    """``.<name>.<kind>-<host>-<pid>`` next to ``target``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{_HOST}-{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:  # some filesystems refuse fsync on folders
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root, name))
        _fsync(Path(root))


def _failed(target: Path, error: OSError) -> WriteError:
    reason = error.strerror or str(error)
    return WriteError(error.errno, f"writing {target} failed ({reason}); the previous version is kept: free space "
                                   "(or fix the folder) and resume with ckpt_path=last.")


def write_file(target: str | Path, write: Callable[[object], None]) -> Path:
    """``write(binary_file)`` into a sibling, ``fsync``, then ``os.replace`` it over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(target)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise _failed(target, error) from None
        raise
    return target


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step; ``False`` where the OS or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_folder(new: str | Path, target: str | Path) -> Path:
    """Move the complete folder ``new`` to ``target``, replacing an older one without a moment of no ``target``
    (two renames where the filesystem cannot exchange names; see the module docstring)."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        _remove(new)  # `new` now names the old version
    else:
        old = sibling(target, "old")
        os.rename(target, old)
        os.rename(new, target)
        _remove(old)
    _fsync(target.parent)
    return target


def write_folder(target: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(folder)`` into a sibling folder, flush it, then :func:`replace_folder` it over ``target``."""
    target = Path(target)
    clean_stale(target)
    tmp = sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        fsync_tree(tmp)
        replace_folder(tmp, target)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise _failed(target, error) from None
        raise
    return target


def _alive(host: str, pid: int) -> bool | None:
    """Whether process ``pid`` of ``host`` runs; ``None`` when it is another host's."""
    if host != _HOST:
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_siblings(target: str | Path, own: bool = False) -> list[tuple[Path, str]]:
    """``(path, kind)`` of the temporary siblings of ``target`` left by dead processes; with ``own`` (the folder
    belongs to this run, e.g. a resumed run) also those of other hosts."""
    target = Path(target)
    found = []
    if not target.parent.is_dir():
        return found
    for path in target.parent.iterdir():
        match = _SIBLING.match(path.name)
        if not match or match["name"] != target.name:
            continue
        alive = _alive(match["host"], int(match["pid"]))
        if alive is False or (alive is None and own):
            found.append((path, match["kind"]))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(target: str | Path, own: bool = False) -> list[Path]:
    """Remove what killed writers left next to ``target``; if one died between the two renames of a folder swap
    (no ``target``, an ``.old`` sibling), its complete new version (else the old one) becomes ``target`` again.
    Returns the removed paths."""
    target = Path(target)
    stale = stale_siblings(target, own)
    if not target.exists() and any(kind == "old" for _, kind in stale):
        olds = {p.name.split(".old-", 1)[1]: p for p, kind in stale if kind == "old"}
        complete = [p for p, kind in stale if kind == "tmp" and p.name.split(".tmp-", 1)[1] in olds]
        keep = complete[0] if complete else next(iter(olds.values()))
        os.rename(keep, target)
        stale = [(p, kind) for p, kind in stale if p != keep]
    for path, _ in stale:
        _remove(path)
    return [p for p, _ in stale]


__all__ = ["WriteError", "sibling", "write_file", "write_folder", "replace_folder", "clean_stale", "stale_siblings",
           "fsync_tree"]
