"""Where a command may write its output folder, and one writer at a time.

The rule for existing outputs: a command replaces only what it made itself. Each command that
writes a folder names the entries it writes (`names_only(...)`) or otherwise recognises its own
output; an existing, non-empty `--out` holding anything else is refused with one line naming
it, unless `--force` (which removes it first). Refused even with --force: the current folder or
one holding it, the home folder, the dinosae package, a folder holding one of the command's
inputs or inside one, a folder inside another dinosae output, and a folder holding another
dinosae output (`--out results`).

The lock: `.<name>.lock` beside the output holds the writer's pid, host and command, locked with
a POSIX record lock (fcntl.lockf; it works across NFS clients) while the command runs. A second
writer exits with one line naming the holder. The kernel drops the lock when its process dies,
so a lock file left by a killed run is simply taken over. Where the file system has no locks,
the file is created exclusively instead and a holder that no longer runs on this host is taken
over. Under the lock, the temporary names (`.<name>.tmp<pid>`, `.<name>.old<pid>`) of earlier,
killed writers are removed.

The rule for a single file (`claim_file`): a command that writes one file (and perhaps a few
beside it: `sample`'s grid and npz) names each with a recogniser of its own files; an existing
regular file there that it did not make is refused in one line unless `--force`. Refused even
with --force: a file that is one of the command's inputs (`--source X --out X`) or lies inside
an input folder, a folder, and anything that is not a regular file or a link (a FIFO, a
device). A link at `--out` is replaced by the file, never written through. The writers write to
a temporary name and rename.

Locks never follow links: a lock path that is a link, a folder or any non-regular file is
refused in one line and never written through.

Torch-free, so that it costs nothing to the light commands.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from dinosae.errors import OutputError, OutputLocked

log = logging.getLogger(__name__)

# what a dinosae output folder holds: a folder with one of these is somebody's output folder
OUTPUT_FILES = ("manifest.json", "zarr.json", "model.safetensors", "checkpoint.pt", "last.pt",
                "metrics.csv")
# results written as single files into a shared folder (results/): --force never removes them
RESULT_FILES = ("samples.h5", "gfid.txt", "recon.txt")
TEMP_NAME = r"\..+\.(?:tmp|old)\d+.*"  # files.atomic_path and the folder writers' temporaries
MAX_CHECKED = 100_000  # entries walked to find another output inside a --force'd folder
PACKAGE = Path(__file__).resolve().parent

# a recogniser: the name of the first entry of a folder that the command did not write, or None
Recogniser = Callable[[Path], "str | None"]


# ---------------------------------------------------------------- the rule for existing outputs

def names_only(*patterns: str) -> Recogniser:
    """A recogniser for a folder whose entries all match one of the regular expressions
    (temporary names of killed runs included). Its `accepts(name)` says whether one name
    matches."""
    regex = re.compile("|".join(f"(?:{p})" for p in (*patterns, TEMP_NAME)))

    def first_foreign(folder: Path) -> str | None:
        with os.scandir(folder) as entries:
            return next((e.name for e in entries if not regex.fullmatch(e.name)), None)

    first_foreign.accepts = lambda name: regex.fullmatch(name) is not None  # type: ignore
    return first_foreign


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _is_output(folder: Path) -> str | None:
    """The file that makes `folder` a dinosae output, or None."""
    return next((n for n in OUTPUT_FILES if os.path.lexists(folder / n)), None)


def check_place(out: str | Path, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse an --out that must never be written, whatever is in it (see the module doc)."""
    out = Path(out)
    target = out.resolve()
    places = [(Path.cwd(), "the current folder"), (PACKAGE, "the dinosae package")]
    home = os.environ.get("HOME")
    if home:
        places.append((Path(home), "your home folder"))
    for place, what in places:
        if _inside(place.resolve(), target):
            raise OutputError(f"--out {out}: is {what} or holds it; give the output a folder of "
                              "its own")
    for given in inputs:
        if given is None or str(given).startswith("hf-hub:"):
            continue
        src = Path(given).resolve()
        if _inside(src, target):
            raise OutputError(f"--out {out}: holds this command's input {given}; give the "
                              "output a folder of its own")
        if _inside(target, src):
            raise OutputError(f"--out {out}: is inside this command's input {given}")
    for parent in target.parents:
        found = _is_output(parent)
        if found:
            raise OutputError(f"--out {out}: is inside {parent}, another dinosae output (it "
                              f"holds {found}); give the output a folder of its own")


def _holds_output(folder: Path, own: Callable[[str], bool]) -> str | None:
    """A path below `folder` that belongs to a dinosae output (other than the names `own`
    accepts at its top level: the command's own files), or None."""
    seen = 0
    for root, dirs, files in os.walk(folder):
        for name in (*files, *dirs):
            if name in OUTPUT_FILES + RESULT_FILES and not (root == str(folder) and own(name)):
                return os.path.join(root, name)
        seen += len(files) + len(dirs)
        if seen > MAX_CHECKED:
            raise OutputError(f"{folder}: more than {MAX_CHECKED} entries; --force will not "
                              "remove that much: remove it yourself")
    return None


def remove_path(path: Path) -> None:
    """Remove a file, a link (not its target) or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def claim(out: str | Path, command: str, ours: Recogniser, force: bool = False) -> None:
    """Refuse an existing, non-empty `out` that `command` did not write (unless `force`: then it
    is removed, unless it holds another dinosae output)."""
    out = Path(out)
    if not os.path.lexists(out):
        return
    if out.is_dir():
        with os.scandir(out) as entries:
            if next(entries, None) is None:
                return
        foreign = ours(out)
        if foreign is None:
            return
        what = f"holds {foreign!r}, which `dinosae {command}` did not write"
    else:
        what = "is a file, not a folder" if out.exists() else "is a dangling link"
    if not force:
        raise OutputError(f"--out {out}: exists and {what}; choose another --out, or pass "
                          "--force to replace it")
    own = getattr(ours, "accepts", lambda name: False)
    found = _holds_output(out, own) if out.is_dir() and not out.is_symlink() else None
    if found:
        raise OutputError(f"--out {out}: holds {found}, another dinosae output; --force does "
                          "not replace that")
    log.warning("--force: removing %s (it %s)", out, what)
    remove_path(out)


def replace_dir(tmp: Path, out: Path) -> None:
    """The finished folder `tmp` becomes `out`; an existing `out` (already claimed) is moved
    aside first and removed after, so `out` is always whole: the old or the new."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if os.path.lexists(out):
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if os.path.lexists(old):
            os.replace(old, out)
        raise
    if os.path.lexists(old):
        remove_path(old)


# ---------------------------------------------------------------- temporaries of killed runs

def remove_stale_temps(out: str | Path) -> list[Path]:
    """Remove the temporary names beside `out` that earlier writers left (`.<name>.tmp<pid>`,
    `.<name>.old<pid>`, with any suffix). Call it holding the lock on `out`."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)(\d+).*")
    removed = []
    with os.scandir(out.parent) as entries:
        stale = [Path(e.path) for e in entries
                 if (m := pattern.fullmatch(e.name)) and int(m.group(1)) != os.getpid()]
    for path in stale:
        log.info("removing %s, left by an earlier run that was stopped", path)
        remove_path(path)
        removed.append(path)
    return removed


# ---------------------------------------------------------------- the lock

def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def _me(command: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _holder(raw: bytes) -> dict:
    try:
        doc = json.loads(raw[:4096])
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}


def _describe(h: dict) -> str:
    if not h:
        return "another process"
    cmd = f"`dinosae {h.get('command')}` " if h.get("command") else ""
    since = f", since {h['since']}" if h.get("since") else ""
    return f"{cmd}(pid {h.get('pid', '?')} on {h.get('host', '?')}{since})"


def _alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # someone else's process, or no pid: assume it runs
    return True


def _file_type(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def _open_lock(path: Path, out: Path, flags: int) -> int:
    """Open the lock file without following a link and without blocking; anything but a
    regular file there is refused (never written through)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
            raise
        try:
            what = _file_type(os.lstat(path).st_mode)
        except OSError:
            what = "not a regular file"
        raise OutputError(f"{out}: its lock file {path} is {what}; locks are never written "
                          "through: remove it and rerun") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OutputError(f"{out}: its lock file {path} is {_file_type(mode)}; locks are never "
                          "written through: remove it and rerun")
    return fd


_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _lock_posix(path: Path, out: Path, me: dict) -> int | None:
    """The locked descriptor of `path`; None where the file system has no locks."""
    while True:
        fd = _open_lock(path, out, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raw = os.pread(fd, 4096, 0)
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise OutputLocked(f"{out}: being written by {_describe(_holder(raw))}; wait "
                                   f"for it to finish or stop it (lock file {path})") from None
            if e.errno in _NO_LOCKS:
                return None
            raise
        try:  # the holder we waited for may have removed the file: lock the current one
            same = os.lstat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    old = _holder(os.pread(fd, 4096, 0))
    if old:
        log.info("%s: taking over the lock of %s, which stopped without releasing it", out,
                 _describe(old))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd


def _lock_exclusive(path: Path, out: Path, me: dict) -> int:
    """Fallback without file-system locks: create the lock file exclusively; a holder that no
    longer runs on this host is taken over."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            try:
                rfd = _open_lock(path, out, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                h = _holder(os.pread(rfd, 4096, 0))
            finally:
                os.close(rfd)
            if h.get("host") == me["host"] and not _alive(h.get("pid")):
                log.info("%s: taking over the lock of %s (no longer running)", out, _describe(h))
                path.unlink(missing_ok=True)
                continue
            raise OutputLocked(f"{out}: being written by {_describe(h)}; wait for it to finish "
                               f"or stop it (lock file {path}; remove it if that process is "
                               "gone)") from None
        os.write(fd, json.dumps(me).encode())
        return fd
    raise OutputLocked(f"{out}: could not take the lock file {path}")


@contextmanager
def output_lock(out: str | Path, command: str) -> Iterator[Path]:
    """Hold the lock on `out` (see the module doc) while the block runs."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path, me = lock_path(out), _me(command)
    fd = _lock_posix(path, out, me)
    if fd is None:
        fd = _lock_exclusive(path, out, me)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # first: a waiting writer then sees a new file
        os.close(fd)


# ---------------------------------------------------------------- all of it

@contextmanager
def writing(out: str | Path, command: str, ours: Recogniser, *, force: bool = False,
            inputs: Iterable[str | Path | None] = (), lock: bool = True) -> Iterator[Path]:
    """Everything a command does before it writes the folder `out`: refuse places it must not
    write, take the lock (`lock`), refuse or (`force`) remove a foreign existing output, remove
    the temporaries of killed runs. The lock is held until the block ends."""
    out = Path(out)
    check_place(out, inputs)
    with output_lock(out, command) if lock else nullcontext():
        claim(out, command, ours, force)
        if lock:
            remove_stale_temps(out)
        yield out


# ---------------------------------------------------------------- single files

# a file recogniser: whether the file at a path is one this command made (never raises)
FileRecogniser = Callable[[Path], bool]


def _same_or_inside(out: Path, given: Path) -> bool:
    try:
        if os.path.exists(out) and os.path.exists(given) and os.path.samefile(out, given):
            return True
    except OSError:
        pass
    src, target = given.resolve(), out.resolve()
    return target == src or (src.is_dir() and src in target.parents)


def claim_file(files: dict[str | Path, FileRecogniser], command: str, *, force: bool = False,
               inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse to write any of `files` (the --out first, then the files the command writes beside
    it, each with the recogniser of its own files) where the module doc says not to."""
    inputs = [Path(i) for i in inputs if i is not None and not str(i).startswith("hf-hub:")]
    out = Path(next(iter(files)))
    for path, ours in files.items():
        path = Path(path)
        name = "--out" if path == out else f"--out {out}: the file beside it,"
        for given in inputs:
            if _same_or_inside(path, given):
                raise OutputError(f"{name} {path}: is this command's input {given} or inside "
                                  "it; give the output a name of its own")
        if not os.path.lexists(path):
            continue
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            raise OutputError(f"{name} {path}: is a folder; give a file name")
        if stat.S_ISLNK(mode):
            what = "is a symbolic link (the file would replace the link, never its target)"
        elif not stat.S_ISREG(mode):
            raise OutputError(f"{name} {path}: is {_file_type(mode)}, not a regular file; give "
                              "another name")
        else:
            try:
                mine = bool(ours(path))
            except Exception:  # a recogniser that cannot read the file: not ours
                mine = False
            if mine:
                continue
            what = f"was not written by `dinosae {command}`"
        if not force:
            raise OutputError(f"{name} {path}: exists and {what}; choose another --out, or "
                              "pass --force to replace it")
        log.warning("--force: replacing %s (it %s)", path, what)


def never_ours(path: Path) -> bool:
    """The recogniser of a file format that carries no mark: every existing file is foreign."""
    return False


def png_ours(path: Path) -> bool:
    """A PNG that dinosae wrote: its tEXt `Software` chunk says dinosae (see images.PNG_MARK)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    return b"tEXtSoftware\x00" + PNG_MARK.encode() in head


def zip_ours(path: Path) -> bool:
    """An .npz (a zip archive) that dinosae wrote: its zip comment is ZIP_MARK."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        return z.comment.startswith(ZIP_MARK.encode())


def kv_ours(*keys: str) -> FileRecogniser:
    """A small `key: value` results file holding every one of `keys`."""
    def ours(path: Path) -> bool:
        if os.path.getsize(path) > 1 << 20:
            return False
        found = {ln.split(":", 1)[0].strip() for ln in path.read_text().splitlines() if ":" in ln}
        return set(keys) <= found
    return ours


def json_ours(*keys: str) -> FileRecogniser:
    """A small JSON object holding every one of `keys` (a report dinosae writes)."""
    def ours(path: Path) -> bool:
        if os.path.getsize(path) > 1 << 20:
            return False
        doc = json.loads(path.read_text())
        return isinstance(doc, dict) and set(keys) <= set(doc)
    return ours


def html_ours(path: Path) -> bool:
    """An HTML page that dinosae wrote (it starts with HTML_MARK)."""
    with open(path, "rb") as f:
        return f.read(len(HTML_MARK)) == HTML_MARK.encode()


def h5_ours(*attrs: str, **values: str) -> FileRecogniser:
    """An HDF5 file with these attributes (and attribute values)."""
    def ours(path: Path) -> bool:
        import h5py

        with h5py.File(path, "r") as f:
            return (all(a in f.attrs for a in (*attrs, *values))
                    and all(str(f.attrs[k]) == v for k, v in values.items()))
    return ours


PNG_MARK = "dinosae"  # the tEXt Software value of every PNG dinosae writes
ZIP_MARK = "dinosae"  # the zip comment of every .npz dinosae writes
HTML_MARK = "<!DOCTYPE html><!-- dinosae -->"  # the start of every HTML page dinosae writes


def mark_zip(path: str | Path) -> None:
    """Set the zip comment of a freshly written .npz to ZIP_MARK (readers ignore it)."""
    import zipfile

    with zipfile.ZipFile(path, "a") as z:
        z.comment = ZIP_MARK.encode()


# ---------------------------------------------------------------- permissions

def umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(path: str | Path) -> None:
    """Give a file the mode a plain open() would have (0666 less the umask): for files that
    libraries write through a private temporary file (safetensors writes 0600)."""
    os.chmod(path, 0o666 & ~umask())
