"""Writing outputs without ever losing a user's data.

Rules every file onnxopt writes (models, their external data, JSON reports) goes through:

* **Refused targets** (:func:`check_output_path`): the input model, any file the input
  references (its external data), a directory, a symbolic link, and anything that is not a
  regular file (character devices such as ``/dev/null``, FIFOs, sockets).  Hard links and
  symlinked spellings of a protected file are caught by comparing inodes.
* **Atomic replacement**: everything is written into a private staging folder beside the
  target and renamed into place.  A model with external data is replaced as one unit: the
  new data file gets a name the *old* output does not reference (``<name>.data`` and
  ``<name>.1.data`` alternate), it is renamed first, then the model; a crash between the two
  renames leaves the old model with its own, untouched data.  Only afterwards is the old
  output's data file removed.  Writers into the same folder are serialised with an advisory
  lock on the folder, so two concurrent runs never leave a model paired with the other's data.
* **Stale staging folders** (left by a process killed with ``kill -9``) are removed by the
  next write into the same folder: their names carry the writer's process id.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import OutputPathError

#: Marker in staging folder names: ``.<target>.onnxopt-staging-<pid>-<random>``.
STAGING_MARK = ".onnxopt-staging-"
_STAGING_PATTERN = re.compile(r"^\..*" + re.escape(STAGING_MARK) + r"(\d+)-[^/]*$")
#: Staging folders of onnxopt versions before the pid-tagged names: ``.<target>.<8 random>``,
#: removed when older than this many seconds (no live writer keeps one that long idle).
_LEGACY_STAGING_AGE = 3600.0

try:  # advisory locks; on platforms without fcntl, writers are not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True if both paths name the same file (following symlinks); False if either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(path: str | os.PathLike, *, protected: Iterable[tuple[Path, str]] = (), what: str = "output") -> Path:
    """Raise OutputPathError unless ``path`` may be (re)placed by a new regular file.

    ``protected`` pairs a path with what it is ("the input model", "the input's external
    data file"): none of them may be the target.
    """
    path = Path(path)
    for other, description in protected:
        if same_file(path, other):
            raise OutputPathError(f"refusing to overwrite {description} {other} with the {what}; choose another path")
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        info = None
    except OSError as exc:
        raise OutputPathError(f"cannot use {path} as the {what}: {exc.strerror}") from exc
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise OutputPathError(f"{what} path {path} is a directory")
        if stat.S_ISLNK(info.st_mode):
            raise OutputPathError(f"{what} path {path} is a symbolic link; give the path of a regular file")
        if not stat.S_ISREG(info.st_mode):
            raise OutputPathError(f"{what} path {path} is not a regular file (a device, FIFO or socket); choose a file path")
    parent = parent_dir(path)
    if not parent.is_dir():
        raise OutputPathError(f"{what} directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} directory {parent} is not writable")
    return path


def parent_dir(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``directory`` for the duration of a replacement."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield  # a folder we cannot open for reading: write unlocked
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock (some network mounts): write unlocked
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A private folder beside ``target``, removed afterwards (even on errors)."""
    parent = parent_dir(target)
    remove_stale_staging(parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise OutputPathError(f"cannot write into {parent}: {exc.strerror or exc}") from exc
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove staging folders in ``directory`` whose writer process is gone; return them."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        match = _STAGING_PATTERN.match(entry.name)
        stale = (match is not None and not _process_alive(int(match.group(1)))) or _is_legacy_staging(entry, now)
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _is_legacy_staging(entry: os.DirEntry, now: float) -> bool:
    """``.<name>.<8 chars>`` holding ``<name>`` and/or ``<name>.data`` and nothing else, idle
    for an hour (an empty folder of that shape may be anybody's: it is left alone)."""
    match = re.match(r"^\.(.+)\.([a-z0-9_]{8})$", entry.name)
    if match is None:
        return False
    target = match.group(1)
    try:
        contents = set(os.listdir(entry.path))
        idle = now - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    return bool(contents) and contents <= {target, target + ".data"} and idle > _LEGACY_STAGING_AGE


def data_file_candidates(path: Path) -> tuple[str, str]:
    """The two names a model's external data alternates between."""
    return (f"{path.name}.data", f"{path.name}.1.data")


def choose_data_name(path: Path, *, old_references: set[Path], protected: Iterable[tuple[Path, str]]) -> str:
    """A data file name beside ``path`` that the current output does not reference, that is
    no protected file, and that is free or a regular file (so it may be replaced)."""
    parent = parent_dir(path)
    protected = list(protected)
    for name in data_file_candidates(path):
        candidate = parent / name
        if any(same_file(candidate, used) for used in old_references):
            continue
        if any(same_file(candidate, other) for other, _ in protected):
            continue
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return name
        if stat.S_ISREG(info.st_mode):
            return name
    raise OutputPathError(
        f"no usable name for the external data of {path}: {' and '.join(data_file_candidates(path))} "
        "are taken by the input, the current output or non-regular files"
    )


def replace_model_files(
    path: Path,
    write_staged: Callable[[Path, str | None], None],
    *,
    external_data: bool,
    old_references: Callable[[Path], set[Path]],
    protected: Iterable[tuple[Path, str]] = (),
) -> None:
    """Write a model (and its external data) with ``write_staged(staged_model, data_name)``
    into a staging folder and swap them in as one unit (see the module docstring)."""
    parent = parent_dir(path)
    protected = list(protected)
    with directory_lock(parent), staging_folder(path) as staging:
        old = old_references(path) if os.path.isfile(path) else set()
        data_name = choose_data_name(path, old_references=old, protected=protected) if external_data else None
        staged_model = staging / path.name
        try:
            write_staged(staged_model, data_name)
            if data_name is not None and (staging / data_name).exists():
                publish(staging / data_name)
                os.replace(staging / data_name, parent / data_name)
            publish(staged_model)
            os.replace(staged_model, path)
        except OSError as exc:
            raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from exc
        _remove_replaced_data(path, old, keep=parent / data_name if data_name else None, protected=protected)


def _remove_replaced_data(path: Path, old: set[Path], *, keep: Path | None, protected: list[tuple[Path, str]]) -> None:
    """Delete the previous output's data files, only those onnxopt names itself."""
    ours = {parent_dir(path) / name for name in data_file_candidates(path)}
    for stale in old:
        if keep is not None and same_file(stale, keep):
            continue
        if not any(same_file(stale, mine) for mine in ours) or any(same_file(stale, p) for p, _ in protected):
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(stale).st_mode):
                os.unlink(stale)


def write_text_atomic(path: str | os.PathLike, text: str, *, protected: Iterable[tuple[Path, str]] = (), what: str = "report") -> Path:
    """Write ``text`` to ``path`` through a staging file and a rename (never half written)."""
    path = check_output_path(path, protected=protected, what=what)
    with staging_folder(path) as staging:
        staged = staging / path.name
        try:
            staged.write_text(text, encoding="utf-8")
            publish(staged)
            os.replace(staged, path)
        except OSError as exc:
            raise OutputPathError(f"cannot write the {what} {path}: {exc.strerror or exc}") from exc
    return path


def publish(path: Path) -> None:
    """Give a staged file the permissions a plain ``open(..., "w")`` would (0666 & ~umask):
    staging helpers create private 0600 files, which other users could not read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
