"""Files on disk: output places checked, atomic outputs (fsync, rename, nothing partial left), a private
temporary folder, hashes, sizes (on disk and zipped)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import signal
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Iterator

from .errors import InputError, OutputError, OutputExistsError, TbOptError

#: errno values that can only mean the output could not be written (not an input that could not be read).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def normalized(path: Path | str) -> Path:
    """``path`` with ``.`` and ``..`` resolved lexically (``ghost/../g.pt`` is ``g.pt``): the folder
    checked, made and written is the one the name means, not a detour through a folder that is not there."""
    text = os.fspath(path)
    return Path(os.path.normpath(text)) if text else Path(".")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(_nearest_existing(folder), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_names(path: Path, what: str = "output") -> None:
    """Refuse, before any work, a path the file system cannot hold: a part longer than its longest name
    (255 bytes on most file systems) or a path longer than its longest path."""
    path = normalized(path)
    limit = _name_max(path.parent)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
            raise OutputError(f"cannot write the {what}: the name {shown!r} is {size} bytes, longer than the "
                              f"{limit} bytes a file name may have here", hint="choose a shorter name with -o")
    try:
        path_max = os.pathconf(_nearest_existing(path.parent), "PC_PATH_MAX")
    except (OSError, ValueError):
        path_max = 4096
    if len(os.fsencode(os.path.abspath(path))) >= path_max:
        raise OutputError(f"cannot write the {what}: its path is longer than the {path_max} bytes a path may "
                          f"have here", hint="choose a shorter path with -o")


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError:  # missing, under a file, or a name too long to look up
        return False
    return True


def _nearest_existing(folder: Path) -> Path:
    folder = Path(folder) if str(folder) else Path(".")
    while not _exists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def check_folder(folder: Path, what: str = "output") -> None:
    """Refuse, before any work, a folder that cannot hold outputs: one under a file, or one whose
    nearest existing folder is not writable (permissions or a read-only file system)."""
    folder = normalized(folder)
    check_names(folder, what)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot write the {what} into {folder}: it is a file, not a folder")
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise OutputError(f"cannot write the {what} into {folder}: {base} is a file, not a folder",
                          hint="choose an output path under a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only(base) else "permission denied"
        raise OutputError(f"cannot write the {what} into {folder}: {base} is not writable ({why})",
                          hint="choose another output path with -o")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_output(path: Path, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse, before any work is done, an output that exists (without ``force``), is an input, has a
    name the file system cannot hold, or lies where nothing can be written (see :func:`check_folder`).
    Returns the path to write, normalized (:func:`normalized`)."""
    path = normalized(path)
    for src in inputs:
        if src is not None and path.resolve() == Path(src).resolve():
            raise InputError(f"output {path} is the input; inputs are never modified",
                             hint="choose another output path with -o")
    check_names(path)
    if path.exists() and not force:
        raise OutputExistsError(path)
    check_folder(path.parent, what=f"output {path.name}")
    return path


def output_error(path: Path, exc: OSError) -> OutputError:
    """An OS error met while writing ``path``, as one line."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"cannot write {path}: no space left on its disk ({exc.strerror})",
                           hint="free some space or write elsewhere with -o; nothing partial was left")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}", hint="nothing partial was left behind")


def make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it made (deepest last), to remove them if the work fails."""
    folder = normalized(folder)
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                remove_empty_folders(missing)
                raise OutputError(f"cannot make the folder {folder}: {d} is a file") from None
        except OSError as exc:
            remove_empty_folders(missing)
            raise output_error(folder, exc) from None
    return list(reversed(missing))


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove the folders :func:`make_folders` made, deepest first, where they are still empty."""
    for d in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()


def _fsync_tree(path: Path) -> None:
    """Flush a written file, or every file and folder of a written folder, to the disk."""
    paths = [path] if not path.is_dir() else [*sorted(p for p in path.rglob("*")), path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a folder; the rename is still done
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) for a few system calls, so that an interrupt lands after them.

    Python runs signal handlers in the main thread only; the handler is swapped for one that
    notes the signal, and the interrupt is raised once the block is done.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 64 * 1024
    except OSError:
        return False


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success flush it to disk and rename it into place.

    The temporary file (or folder, for ``directory=True``, e.g. an ``.mlpackage``) lives in a
    hidden temporary folder of a short name (``.tbopt-XXXXXXXX.tmp``) in the target's folder, so the
    final rename is atomic and any name the file system accepts can be written. ``path`` is
    normalized first (:func:`normalized`). Missing folders
    are made. If the body raises or is interrupted, the temporary folder and the folders made
    for it are removed and ``path`` is left as it was; an OS error while writing (a full disk, a
    read-only file system) becomes an :class:`OutputError`.
    """
    path = normalized(path)
    check_names(path)
    if path.exists() and not force:
        raise OutputExistsError(path)
    check_folder(path.parent, what=f"output {path.name}")
    made = make_folders(path.parent)
    try:
        # a short name of its own (not the output's, which may be as long as a name can be)
        tmp_dir = Path(tempfile.mkdtemp(prefix=".tbopt-", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        remove_empty_folders(made)
        raise output_error(path, exc) from None
    tmp = tmp_dir / path.name
    done = False
    try:
        try:
            yield tmp
            if not tmp.exists():
                raise RuntimeError(f"nothing was written to the temporary output for {path}")
            _fsync_tree(tmp)
        except (TbOptError, KeyboardInterrupt):
            raise
        except Exception as exc:
            if isinstance(exc, OSError) and (exc.errno in _WRITE_ERRNOS or str(tmp_dir) in str(exc.filename or "")):
                raise output_error(path, exc) from None
            if _disk_full(path.parent):  # writers in C++ (torch.save) or copytree report a full disk as anything
                raise output_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from exc
            raise
        with _interrupts_held():
            if path.exists() and (path.is_dir() or directory) and not path.is_symlink():
                # A folder cannot be replaced atomically: move the old one aside, put it back on failure.
                old = tmp_dir / ("old" if path.name != "old" else "old-1")
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except OSError:
                    os.replace(old, path)
                    raise
            else:
                os.replace(tmp, path)
        _fsync_folder(path.parent)
        done = True
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if not done:
            remove_empty_folders(made)


#: The lock file a command holds in the folder it writes into (:func:`folder_lock`).
LOCK_NAME = ".tbopt.lock"


class FolderBusyError(OutputError):
    """Another tbopt process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: Path, command: str) -> Iterator[None]:
    """Hold an advisory lock (``flock``) on ``folder`` for the block: one command at a time writes there.

    The lock is a file inside the folder (made if missing, with its missing parents) that records the
    holder's pid and command. A second command refuses at once, naming the folder and the holder. The
    kernel releases a ``flock`` when its process ends, however it ends, so a lock file left by a killed
    process does not block. At the end the lock file is removed, and the folders made for it if empty.
    """
    import fcntl  # noqa: PLC0415 - POSIX only, and only for the commands that write into a folder

    folder = normalized(folder)
    made = make_folders(folder)
    path = folder / LOCK_NAME
    fd = -1
    try:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise output_error(path, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                fd = -1
                raise FolderBusyError(f"{folder} is in use by another tbopt command ({holder}); one command "
                                      f"at a time writes into a folder",
                                      hint="wait for it to end, or choose another output folder") from None
            # The holder before us may have removed the file after we opened it: lock the file the path names.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = -1
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}: {command}\n".encode())
        except OSError as exc:  # a full disk
            raise output_error(path, exc) from None
        yield
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                path.unlink()  # while still held: nobody else can have locked this file
            os.close(fd)
        remove_empty_folders(made)


def _lock_holder(fd: int) -> str:
    """Who holds a lock, as its file records it ("pid 123: tbopt optimize ...")."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "a process that has not yet written its pid"


@contextlib.contextmanager
def scratch_tempdir() -> Iterator[Path]:
    """A private temporary folder for the block: ``tempfile`` (and so coremltools' temporary
    packages and converter folders) writes there, and it is removed with everything in it at the
    end, on success, error or Ctrl-C. The previous ``tempfile.tempdir`` is restored."""
    old = tempfile.tempdir
    folder = Path(tempfile.mkdtemp(prefix="tbopt-"))
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = old
        shutil.rmtree(folder, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (sorted relative paths and contents)."""
    h = hashlib.sha256()
    path = Path(path)
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(b"\0")
            h.update(f.read_bytes())
        return h.hexdigest()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or the sum of a folder's files (an ``.mlpackage``)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def zipped_size(path: Path) -> int:
    """Bytes after DEFLATE compression at level 9, as an app bundle / download would be."""
    path = Path(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                zf.write(f, str(f.relative_to(path.parent)))
        else:
            zf.write(path, path.name)
    return buf.getbuffer().nbytes


def zipped_size_of_bytes(data: bytes, name: str) -> int:
    """:func:`zipped_size` of a file's content held in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr(name, data)
    return buf.getbuffer().nbytes


def require_file(path: Path, what: str = "file", error: type[InputError] = InputError) -> Path:
    """A readable, non-empty regular file, or a clear ``error`` naming it."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise error(f"{what} {path} is empty (0 bytes)")
    return path
