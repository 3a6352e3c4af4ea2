"""Small file helpers shared by every stage: atomic outputs and JSON."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmops.errors import DiskFullError, LmopsError

# no space left, a file over RLIMIT_FSIZE / the filesystem's largest file, quota exceeded
DISK_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if code
)
# libraries that wrap the OS error in their own (safetensors, pyarrow) keep its number
_WRAPPED_ERRNO = re.compile(r"(?:os error|errno)\s*(\d+)", re.IGNORECASE)


def disk_full_reason(err: BaseException | None) -> str | None:
    """``"No space left on device"`` etc. when ``err`` means the disk (or quota, or file
    size limit) is full, else None. Looks through the causes that libraries chain."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFullError):
            return err.reason
        code = err.errno if isinstance(err, OSError) else None
        if code is None and not isinstance(err, LmopsError):
            match = _WRAPPED_ERRNO.search(str(err))
            code = int(match.group(1)) if match else None
        if code is not None and code in DISK_FULL_ERRNOS:
            return os.strerror(code)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def _within(path: Any, folder: Path) -> bool:
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve())
    except (TypeError, ValueError, OSError):  # an fd number, or not a path at all
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it into place only on success.

    A stage that fails (or is killed) never leaves a half-written output that
    DVC could cache as valid: the old output is removed up front, and the new
    one appears under its real name only once it is complete. A write that fails
    for want of space raises :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    # mkdtemp makes the directory private (0700); outputs should look like any other dir.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    target = tmp if is_dir else tmp / path.name
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"{path}: stage produced no output")
        if not is_dir:
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(target, path)
    except Exception as err:
        reason = disk_full_reason(err)
        if reason is None:
            raise
        # a write into the temporary dir is named after this output (the outermost wins);
        # one elsewhere (a cache under TMPDIR: perhaps another disk) keeps its own name
        where = err.path if isinstance(err, DiskFullError) else getattr(err, "filename", None)
        if where is not None and not _within(where, tmp):
            if isinstance(err, DiskFullError):
                raise
            raise DiskFullError(where, reason) from err
        raise DiskFullError(path, reason) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), pretty and key-sorted."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def file_digest(path: str | Path) -> str:
    """md5 of a file, or of a directory's sorted (name, md5) listing."""
    path = Path(path)
    h = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
