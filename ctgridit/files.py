"""Writing output files atomically: a reader never sees a half-written file.

Everything ctgridit writes for a user (NIfTI volumes, PNG pictures, checkpoints)
goes through :func:`atomic_output`: the content is written to a temporary file in
the destination folder and renamed over the destination only when writing
succeeded. On any error the temporary file is removed and the destination is
left as it was. The outputs of one command (a volume, its preview, its report)
are written inside :func:`output_group`: they are renamed together at its end,
with Ctrl-C, SIGTERM and SIGHUP held for those few renames, so they appear
together or not at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ctgridit.errors import CTGridItError
from ctgridit.signals import deferred


#: The files ``synth`` writes a video clip as; a name without a suffix is a folder of PNG frames.
#: (Here, not in :mod:`ctgridit.video`, so that the CT commands can refuse a clip name without importing PyAV.)
CLIP_SUFFIXES = (".mp4", ".gif")


def is_clip_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a clip file (``.mp4``, ``.gif``) rather than a folder of PNG frames."""
    return Path(path).suffix.lower() in CLIP_SUFFIXES


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse, before any work is done, an output that cannot or should not be written."""
    out = Path(path)
    if out.is_dir():
        raise CTGridItError("is a folder, not a file name", out, "give a file name such as out.nii.gz")
    if out.exists() and not force:
        raise CTGridItError("output exists", out, "pass --force to overwrite it or choose another name")
    _check_writable_folder(out.parent)
    return out


def check_output_folder(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse, before any work, an output *folder* that cannot be written or would be replaced without ``force``.

    The folder itself may not exist yet (it is created, atomically, by
    :func:`atomic_folder`); its parent must be a writable folder.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CTGridItError("exists and is not a folder", out, "give a folder name")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CTGridItError("folder exists and is not empty", out,
                            "pass --force to replace it or choose another folder")
    _check_writable_folder(out.parent)
    return out


def _check_writable_folder(parent: Path) -> None:
    """The folder an output goes into: it exists, is a folder, and a file can be created in it."""
    if not parent.is_dir():
        blocker = next((p for p in [parent, *parent.parents] if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise CTGridItError("is a file, not a folder", blocker, "choose an output path inside a folder")
        raise CTGridItError("output folder does not exist", parent, "create it first")
    try:  # a real write, not os.access: root passes access checks on read-only mounts
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise CTGridItError(f"output folder is not writable ({err.strerror})", parent,
                            "choose a folder you can write to") from err


def _suffixes(path: Path) -> str:
    """Keep the full extension (``.nii.gz``) so that writers that look at it still work."""
    return "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    Use as::

        with atomic_output("vol.nii.gz") as tmp:
            nib.save(img, tmp)
    """
    out = check_output_path(path, force=force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp" + _suffixes(out), dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    group = _GROUP.get()
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; honour the umask instead
        if group is not None:
            group.append((tmp, out))      # renamed with the other outputs of the group
        else:
            os.replace(tmp, out)
    except OSError as err:  # disk full, quota, a folder removed under us: the user's to fix
        _remove(tmp)
        raise CTGridItError(f"could not write the file ({err.strerror or err})", out,
                            "check the free space and permissions of its folder") from err
    except BaseException:
        _remove(tmp)
        raise


#: The outputs written so far inside :func:`output_group`, ``(temporary, final)``; None outside one.
_GROUP: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar("ctgridit_outputs",
                                                                                        default=None)


@contextlib.contextmanager
def output_group() -> Iterator[None]:
    """Every :func:`atomic_output` inside appears at the end of the block, all together, or none does.

    The renames run with SIGINT, SIGTERM and SIGHUP held (a signal that arrives then is handled right after:
    the outputs are complete by then); an error or a stop before the end removes every temporary file.
    """
    pending: list[tuple[Path, Path]] = []
    token = _GROUP.set(pending)
    try:
        yield
        _GROUP.reset(token)
        token = None
        with deferred():
            for tmp, out in pending:
                _replace_folder(tmp, out) if tmp.is_dir() else os.replace(tmp, out)
    except OSError as err:
        for tmp, _ in pending:
            _discard(tmp)
        raise CTGridItError(f"could not write the outputs ({err.strerror or err})", pending[0][1].parent if pending
                            else None, "check the free space and permissions of its folder") from err
    except BaseException:
        for tmp, _ in pending:
            _discard(tmp)
        raise
    finally:
        if token is not None:
            _GROUP.reset(token)


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else _remove(path)


def report_json(data: dict, reasons: dict[str, str] | None = None) -> str:
    """``data`` as strict JSON text: a figure that is not a finite number (infinite PSNR, NaN) is written as
    ``null``, and ``"notes"`` says why, per figure: ``reasons`` by the figure's name, else what the value was."""
    import json
    import math

    notes: dict[str, str] = {}

    def clean(value, where: str):
        if isinstance(value, float) and not math.isfinite(value):
            name = where.rsplit(".", 1)[-1]
            notes[where] = (reasons or {}).get(name, "infinite" if math.isinf(value) else "not a number here")
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(data, "")
    if notes:
        out["notes"] = notes
    return json.dumps(out, indent=2, allow_nan=False) + "\n"


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """The folder counterpart of :func:`atomic_output`.

    Yield an empty hidden folder next to ``path``; on success it replaces
    ``path`` (an existing folder is moved aside first and removed after), on any
    error it is removed. Callers decide beforehand whether replacing is allowed.
    """
    out = Path(path)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        raise CTGridItError(f"output folder is not writable ({err.strerror})", out.parent,
                            "choose a folder you can write to") from err
    group = _GROUP.get()
    try:
        yield staging
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700 folders; honour the umask instead
        if group is not None:
            group.append((staging, out))  # renamed with the other outputs of the group
        else:
            _replace_folder(staging, out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise CTGridItError(f"could not write the folder ({err.strerror or err})", out,
                            "check the free space and permissions of its folder") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_folder(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    if not out.exists():
        new.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    out.rename(old / out.name)
    try:
        new.rename(out)
    except OSError:
        (old / out.name).rename(out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
