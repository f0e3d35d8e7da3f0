"""Output folders written atomically, and the rules for replacing one.

A folder is written as a temporary folder beside the target and renamed at the end. Every folder written so holds
a marker file (``MARKER``); an existing non-empty target is replaced only when it holds that marker (it is an
earlier export) and never when it is, contains or lies inside a protected folder (the run it was exported from),
or is or contains the current directory or ``$HOME``. The temporary folder's name carries the host and the pid of
its writer, so the leftovers of a killed writer are recognised and removed by the next write into the same place,
while a live writer's are left alone.
"""

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".finetune-export"  # written into every folder ``atomic_folder`` makes: "an earlier export, replaceable"
_RANDOM = r"[a-z0-9_]{8}"  # tempfile's random part


class UnsafeTarget(FileExistsError):
    """An existing output folder that may not be replaced."""


def _host() -> str:
    return re.sub(r"[^\w.]", "_", socket.gethostname())


def _scratch_name(out: Path, kind: str) -> str:
    """``.NAME.tmp-HOST-PID-`` (mkdtemp appends the random part): what ``stale_leftovers`` reads back."""
    return f".{out.name}.{kind}-{_host()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_leftovers(out: Path) -> list[Path]:
    """Temporary (``tmp``) and moved-aside (``old``) folders beside ``out`` whose writer, on this host, is dead."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(?P<host>.+)-(?P<pid>\d+)-{_RANDOM}$")
    if not out.parent.is_dir():
        return []
    stale = []
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and m["host"] == _host() and not _alive(int(m["pid"])):
            stale.append(p)
    return sorted(stale)


def remove_stale_leftovers(out: Path) -> list[Path]:
    """Removes what ``stale_leftovers`` finds (each logged); returns the removed paths."""
    removed = stale_leftovers(out)
    for p in removed:
        log.warning("removing %s: left by a killed writer of %s", p, out)
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return removed


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def check_target(out: str | os.PathLike, *, overwrite: bool = False, protect: Iterable[Path] = ()) -> None:
    """Raises unless writing ``out`` is allowed: a new or empty folder, or (with ``overwrite``) an earlier export
    (one holding ``MARKER``). Never a folder that is, contains or lies inside one of ``protect``, nor one that is
    or contains the current directory or ``$HOME`` (symlinks resolved)."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    target = out.resolve()
    for folder in protect:
        folder = Path(folder).resolve()
        if _contains(target, folder) or _contains(folder, target):
            where = "is" if target == folder else "contains" if _contains(target, folder) else "lies inside"
            raise UnsafeTarget(f"{out}: {where} {folder}, which this export reads from; choose another --out")
    for name, folder in (("the current directory", Path.cwd()), ("$HOME", Path.home())):
        folder = folder.resolve()
        if _contains(target, folder):
            where = "is" if target == folder else "contains"
            raise UnsafeTarget(f"{out}: {where} {name} ({folder}); choose a folder of its own for the export")
    if not target.is_dir():
        raise UnsafeTarget(f"{out}: exists and is not a folder; choose another --out")
    if not any(target.iterdir()):
        return
    if not (target / MARKER).is_file():
        raise UnsafeTarget(f"{out}: exists, is not empty and is not an earlier export (it has no {MARKER} file); "
                           "--force replaces only an earlier export: choose another folder or empty it")  # fmt: skip
    if not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (an earlier export; pass --force / overwrite=True "
                              "to replace it)")  # fmt: skip


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_modes(folder: Path) -> None:
    """Folders ``0o777`` and files ``0o666`` less the umask, as ``mkdir`` and ``open`` make them (``mkdtemp``
    makes ``0o700``, which a server run as another user cannot read)."""
    mask = _umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def swap_in(new: Path, target: Path) -> None:
    """Puts ``new`` (a file or folder beside ``target``) in ``target``'s place. A file replaces it in one rename; an
    existing folder is moved aside (``.NAME.old-HOST-PID-xxxx/NAME``), not deleted, until ``new`` is in place, so a
    kill in between leaves the old one whole."""
    if new.is_file() and not target.is_dir():
        os.replace(new, target)
        return
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=_scratch_name(target, "old"), dir=target.parent))
        target.rename(old / target.name)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, overwrite: bool = False, protect: Iterable[Path] = ()):
    """Yields a temporary folder beside ``out_dir`` that becomes ``out_dir`` (with ``MARKER``, usual modes) when
    the block succeeds; on any failure it is removed, and an existing ``out_dir`` is left as it was. What may be
    replaced: ``check_target``. Leftovers of a killed earlier write into ``out_dir`` are removed first."""
    out = Path(out_dir)
    protect = list(protect)
    check_target(out, overwrite=overwrite, protect=protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=_scratch_name(out, "tmp"), dir=out.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"written_by": "finetune"}) + "\n")
        _usual_modes(tmp)
        check_target(out, overwrite=overwrite, protect=protect)  # again: the target may have changed meanwhile
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: str | os.PathLike, *, encoding: str = "utf-8"):
    """Yields a text file open for writing beside ``out`` (``.NAME.tmp-HOST-PID-xxxxxxxx``) that becomes ``out``
    (synced, usual modes, renamed) when the block succeeds; on any failure, an interrupt or ``SystemExit`` included,
    it is removed and an existing ``out`` is left as it was. Leftovers of a killed earlier writer of ``out`` are
    removed first (``stale_leftovers``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(out)
    fd, tmp = tempfile.mkstemp(prefix=_scratch_name(out, "tmp"), dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
