"""Files that are complete or absent, and folders that one job owns.

* Atomic writes: write to a temporary file in the destination folder, then rename.  A killed
  process never leaves a half-written file under the final name, and an existing file under that
  name stays intact until the new one is complete.  Temporary names carry the host and process id
  of the writer, so a later run can tell the leftovers of dead writers (:func:`clean_stale_temps`)
  from those of writers still running.
* Storage faults (disk full, quota, read-only folder) become one :class:`StorageError` naming the
  path and the reason, instead of whatever the writing library makes of them.
* :class:`OutputLock`: one job per output folder (a lock file with host, pid and job id).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import time
from pathlib import Path

from ..errors import DataFormatError, LockedError, StorageError

_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                   errno.ENAMETOOLONG}
_HOST = socket.gethostname().split(".")[0].replace(".", "_") or "host"


def storage_error(exc: BaseException, path, action: str = "write") -> StorageError | None:
    """A StorageError for ``exc`` when it is (or wraps) a storage fault, else None."""
    e = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            reason = {errno.ENOSPC: "no space left on the device (disk full)", errno.EDQUOT: "disk quota exceeded",
                      errno.EROFS: "read-only file system", errno.EFBIG: "file too large for the file system",
                      errno.ENAMETOOLONG: "file name too long for the file system (choose a shorter name)"}.get(
                e.errno, os.strerror(e.errno))
            return StorageError(f"cannot {action} {path}: {reason} [{errno.errorcode.get(e.errno, e.errno)}]")
        e = e.__cause__ or e.__context__
    return None


def hdf5_lock_error(exc: BaseException, path, what: str = "data set") -> StorageError | None:
    """A StorageError for an HDF5 open that failed on HDF5's file lock, else None.  Such a file is
    intact: another process holds it open for writing (h5py mode 'a' or 'r+', a notebook), or the
    file system has no file locks (some Lustre, NFS and GPFS mounts).  It was reported as a
    'corrupt or truncated data set' (sweep 20), which invites deleting a good file."""
    if not isinstance(exc, OSError) or "unable to lock file" not in str(exc):
        return None
    return StorageError(f"{path}: cannot open the {what}: HDF5 could not lock the file ({str(exc).split('(', 1)[-1].rstrip(')')}); "
                        f"the file is not damaged: another process holds it open for writing (h5py mode 'a' or "
                        f"'r+', a notebook?): close it; or the file system does not support file locks (Lustre, "
                        f"NFS, GPFS): export HDF5_USE_FILE_LOCKING=FALSE before the run")


def free_bytes(path) -> int | None:
    """Bytes free to this user on the file system of ``path`` (its nearest existing folder);
    None when the system cannot tell."""
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _disk_full(path) -> bool:
    free = free_bytes(path)
    return free is not None and free < (1 << 16)


def name_max(folder) -> int:
    """The longest file name (bytes) the file system of ``folder`` (its nearest existing folder)
    takes."""
    folder = Path(folder)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def fit_name(name: str, room: int) -> str:
    """``name`` itself when it has at most ``room`` bytes, else cut with a digest of the whole
    name appended (``CUT~DIGEST``), so that names made from a long file name (its temporary file,
    its descriptor cache) stay within the file system's limit and distinct."""
    if len(name.encode()) <= room:
        return name
    import hashlib

    tag = "~" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name.encode()[:max(1, room - len(tag))].decode(errors="ignore") + tag


def temp_path(final, suffix: str = ".tmp") -> Path:
    """A fresh temporary name next to ``final``: ``.NAME.HOST.PID.RANDOM.tmp``.  NAME is shortened
    (:func:`fit_name`) where the temporary name would exceed the file system's name limit: a final
    name of 240 characters is legal, its temporary name was not (sweep 20: convert -o ended in a
    traceback, 'File name too long', naming the temporary file)."""
    final = Path(final)
    tail = f".{_HOST}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"
    name = fit_name(final.name, name_max(final.parent) - len(f".{tail}".encode()))
    return final.with_name(f".{name}{tail}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder, older_than_s: float = 0.0) -> list[Path]:
    """Remove temporary files and folders of dead writers in ``folder`` (names from
    :func:`temp_path` whose host is this host and whose process no longer exists).  Leftovers of
    other hosts are kept (their writers may be alive).  Returns what was removed."""
    import shutil

    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        parts = p.name.split(".")
        # "", NAME..., HOST, PID, RANDOM, "tmp" (or another suffix)
        if not p.name.startswith(".") or len(parts) < 5:
            continue
        host, pid = parts[-4], parts[-3]
        if host != _HOST or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            if older_than_s and now - p.stat().st_mtime < older_than_s:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def rename_target(final) -> Path:
    """The file that writing ``final`` by rename replaces: a symbolic link's target (the link is
    kept); a StorageError when ``final`` exists but is not a regular file (``-o /dev/null`` as a
    dry run, run as root, turned the device into a plain file for every program on the machine)."""
    final = Path(final)
    if len(final.name.encode()) > name_max(final.parent):
        raise StorageError(f"cannot write {final}: its name has {len(final.name.encode())} bytes, more than the "
                           f"{name_max(final.parent)} the file system takes; choose a shorter name")
    if final.is_symlink():
        final = Path(os.path.realpath(final))
    if final.exists() and not final.is_file():
        raise StorageError(f"cannot write {final}: it exists and is not a regular file (a device, pipe or "
                           f"folder), which writing by rename would replace; give a file name")
    return final


@contextlib.contextmanager
def atomic_path(final, suffix: str = ".tmp"):
    """Yield a temporary path next to ``final``; rename it onto ``final`` on success.

    On an exception the temporary file is removed and ``final`` is untouched; a storage fault is
    raised as :class:`StorageError` naming ``final``.  A symbolic link is written through (its
    target is replaced, the link kept); a ``final`` that exists but is not a regular file (a
    device such as /dev/null, a pipe, a folder) is refused, since the rename would replace it
    by a plain file (for /dev/null, as root: for every program on the machine)."""
    final = rename_target(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (storage_error(exc, final.parent, "create the folder") or exc) from None
    tmp = temp_path(final, suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic write of {final}: nothing was written to {tmp}")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except StorageError:
        raise
    except Exception as exc:
        err = storage_error(exc, final)
        if err is None and _disk_full(final):
            # libraries that report a full disk without its errno (torch's zip writer, HDF5)
            err = StorageError(f"cannot write {final}: no space left on the device (disk full) "
                               f"[{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}]")
        if err is not None:
            raise err from None
        raise
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass


def json_text(obj, **kw) -> str:
    """``json.dumps`` for result files that other programs read: a non-finite float (a metric of an
    empty set, an aborted MD's last energy) becomes null, since Python's bare NaN / Infinity are
    not JSON and make strict readers (jq, JavaScript, most languages' parsers) reject the file."""
    import json
    import math

    def clean(o):
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if hasattr(o, "tolist") and not isinstance(o, (str, bytes)):     # numpy scalars and arrays
            return clean(o.tolist())
        return o

    return json.dumps(clean(obj), allow_nan=False, **kw)


def atomic_write_text(final, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj, final, durable: bool = True) -> None:
    """torch.save to ``final`` atomically.  The file is written through a Python file object, so
    that a full disk raises OSError(ENOSPC) here (torch's own writer reports it as an unrelated
    "unexpected pos")."""
    import torch

    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())


def check_writable(folder, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove that a file can be written there (before any long
    work starts); a StorageError naming the folder otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / "write-probe")
        try:
            with open(probe, "wb") as fh:
                fh.write(b"x")
        finally:
            # also when the write fails (a full disk: the file exists, the byte does not fit);
            # the probe was left behind in the folder (sweep 20)
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as exc:
        raise (storage_error(exc, folder, f"write to the {what}")
               or StorageError(f"cannot write to the {what} {folder}: {exc.strerror or exc}")) from None
    return folder


def load_torch_file(path, what: str = "file"):
    """torch.load (weights only, to CPU) with a clear DataFormatError for a missing, truncated or
    foreign file: ``what`` names the kind of file in the message (model file, checkpoint, ...)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{what} {path} does not exist")
    check_zip_crcs(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataFormatError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc}); a truncated or damaged "
                              f"file?") from None


def check_zip_crcs(path, what: str = "file") -> None:
    """torch.save writes a zip archive with a CRC-32 per record, which torch.load does not check:
    a flipped bit in a weight loaded silently.  Check them (one read of the file)."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return                      # a legacy (non-zip) torch file: torch.load decides
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataFormatError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc}); a truncated or damaged "
                              f"file?") from None
    if bad is not None:
        raise DataFormatError(f"{path}: {what} is damaged: record {bad} fails its checksum (CRC-32); restore it "
                              f"or write it again")


def _job_id() -> str:
    for k in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "OMPI_MCA_ess_base_jobid"):
        if os.environ.get(k):
            return f"{k}={os.environ[k]}"
    return ""


class OutputLock:
    """One job per output folder: ``FOLDER/.distmlip.lock`` holds host, pid, job id and start
    time of the job that writes there.  A lock of a dead process on this host is taken over with a
    note; a live one (or one of another host) is an error naming it, unless ``force``."""

    NAME = ".distmlip.lock"

    def __init__(self, folder, force: bool = False, what: str = "output folder", log=None, file: str | None = None):
        # file: lock one output file of the folder (FOLDER/.FILE.distmlip.lock), not the folder
        self.path = Path(folder) / (f".{file}{self.NAME}" if file else self.NAME)
        self.target = Path(folder) / file if file else Path(folder)
        self.force = force
        self.what = what
        self.log = log
        self.held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "OutputLock":
        info = {"host": _HOST, "pid": os.getpid(), "job": _job_id(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        # a file's lock sits in the file's folder: the message names that folder as a folder
        # ("cannot write to the output file ro" named a read-only folder, sweep 20)
        check_writable(self.path.parent, self.what if self.target == self.path.parent else f"folder of the {self.what}")
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self._holder()
                here = h.get("host") == _HOST and isinstance(h.get("pid"), int)
                dead = here and not _pid_alive(h["pid"])
                # the same batch job (requeued) may take over, but not from a live process on this
                # host: two srun steps of one allocation, or two runs a script started in the
                # background, share the job id (sweep 13: both wrote one log.csv)
                same = (here and h["pid"] == os.getpid()) or (bool(info["job"]) and h.get("job") == info["job"]
                                                              and not (here and _pid_alive(h["pid"])))
                if dead or same or self.force:
                    if self.log is not None and not (here and h["pid"] == os.getpid()):
                        why = ("its process is gone" if dead else "the same batch job (requeued)" if same
                               else "--force")
                        self.log(f"taking over the lock of {self.path.parent} from host {h.get('host')} pid "
                                 f"{h.get('pid')} {h.get('job', '')} ({why})")
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                    continue
                raise LockedError(
                    f"{self.what} {self.target} is in use by another job: host {h.get('host')}, pid "
                    f"{h.get('pid')}{', ' + h['job'] if h.get('job') else ''}, started {h.get('started')} "
                    f"(lock file {self.path}); choose another output, or pass --force (or remove the lock "
                    f"file) if that job is gone")
            except OSError as exc:
                raise (storage_error(exc, self.path) or exc) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            self.held = True
            return self
        raise LockedError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                if self._holder().get("pid") == os.getpid():
                    self.path.unlink()
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
