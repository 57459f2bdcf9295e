"""Reading CT volumes (HU + geometry) from disk and writing them as NIfTI.

:func:`read_ct` is the single entry point. It reads

- NIfTI ``.nii`` / ``.nii.gz`` with nibabel: scl_slope/scl_inter applied, the
  affine that nibabel picks (sform, else qform, else the voxel sizes);
- NRRD / MetaImage ``.nrrd .nhdr .mha .mhd`` with SimpleITK: its ``(z, y, x)``
  array is transposed to ``(x, y, z)`` and its LPS geometry converted with
  :meth:`CTVolume.affine_from_itk`;
- a DICOM series: a folder, or a ``.zip`` of one (see :mod:`ctgridit.ct.dicom`).

It always returns float32 HU in ``(x, y, z)`` order with the RAS affine of
:class:`CTVolume`, ``source`` and ``source_dtype`` (the on-disk type) set, and
the voxels fully loaded, so a damaged file fails here. Anything wrong with the
input (missing, not an image, truncated, 2D, 4D, NaN/Inf voxels, degenerate
geometry) is a :class:`CTGridItError` naming the file; no library exception
escapes. Trailing dimensions of size 1 (``x, y, z, 1``) are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

from ctgridit.ct.dicom import read_dicom_series, read_dicom_zip
from ctgridit.ct.volume import CTVolume
from ctgridit.errors import CTGridItError, CTGridItWarning
from ctgridit.files import atomic_output, check_output_path
from ctgridit.limits import check_memory, gigabytes

HU_INT16_MIN, HU_INT16_MAX = -32768, 32767
#: Data whose middle 98 % span fewer HU than this, with fractions, are not HU (probabilities, [0, 1] images...).
NOT_HU_RANGE = 20.0
#: Voxel axes whose cosines exceed this are sheared.
SHEAR_TOLERANCE = 1e-4
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED = ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, a DICOM folder or a .zip of one"


def read_ct(path: str | os.PathLike, series_uid: str | None = None) -> CTVolume:
    """Read a CT volume in HU with its geometry from any supported input (see the module docstring).

    ``series_uid`` picks one series of a DICOM folder or zip; it is refused for
    other inputs.
    """
    p = Path(path)
    if not p.exists():
        raise CTGridItError("no such file or folder", p, "check the path")
    if p.is_dir() or p.name.lower().endswith(".zip") and p.is_file():
        volume = read_dicom_series(p, series_uid) if p.is_dir() else read_dicom_zip(p, series_uid)
        _warn_not_hu(volume.array, p)
        return volume
    if not p.is_file():
        raise CTGridItError("is not a regular file (a pipe, socket or device)", p, "give a file on disk")
    name = p.name.lower()
    if series_uid is not None:
        raise CTGridItError("a series UID only applies to a DICOM folder or zip", p, "leave out the series UID")
    if name.endswith(NIFTI_SUFFIXES):
        array, affine, dtype = _read_nifti(p)
    elif name.endswith(ITK_SUFFIXES):
        array, affine, dtype = _read_itk(p)
    else:
        raise _unreadable(p)
    _check_values(array, affine, p)
    _warn_not_hu(array, p)
    return CTVolume(array, _straightened(affine, p), source=str(p), source_dtype=dtype)


def write_nifti(volume: CTVolume, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``volume`` as an int16 HU NIfTI-1 file (``.nii`` or ``.nii.gz``), atomically.

    HU are rounded to the nearest integer and clipped to the int16 range. The
    qform and the sform both hold ``volume.affine`` with code 1 (scanner),
    units are mm, and scl_slope/scl_inter are 1/0, so every reader sees the
    stored integers as HU. The file appears only once complete; on any error
    nothing is left behind and an existing file is kept. An existing output
    is refused unless ``force``.
    """
    out = Path(path)
    if not out.name.lower().endswith(NIFTI_SUFFIXES):
        raise CTGridItError("not a NIfTI file name", out, "end the output name with .nii.gz or .nii")
    check_output_path(out, force=force)
    if not np.isfinite(volume.array).all():
        raise CTGridItError("the volume to write has NaN or infinite values", out, "this is a bug: please report it")
    _warn_int16_losses(volume, out)
    img = _nifti_image(volume)
    with atomic_output(out, force=force) as tmp:  # turns OSError (disk full...) into a CTGridItError
        nib.save(img, tmp)
    return out


def _nifti_image(volume: CTVolume) -> nib.Nifti1Image:
    """The int16 NIfTI image of ``volume``; explicit slope/inter 1/0 also stop nibabel from rescaling."""
    data = np.clip(np.rint(volume.array), HU_INT16_MIN, HU_INT16_MAX).astype(np.int16)
    img = nib.Nifti1Image(data, volume.affine)
    img.set_data_dtype(np.int16)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0, 0.0)
    return img


def _warn_int16_losses(volume: CTVolume, out: Path) -> None:
    """Say so when int16 HU cannot hold the volume's values: clipping, or data that are not HU at all."""
    a = volume.array
    clipped = int(np.count_nonzero((a < HU_INT16_MIN) | (a > HU_INT16_MAX)))
    if clipped:
        warnings.warn(f"{out}: {clipped:,} voxels beyond the int16 range {HU_INT16_MIN}..{HU_INT16_MAX} were set to "
                      "its ends", CTGridItWarning, stacklevel=3)
    sample = a.ravel()[:: max(1, a.size // 1_000_000)]
    low, high = np.percentile(sample, [1, 99])
    # small fractional values near 0 (probabilities, [0, 1] images); not a narrow range of real HU (air, water)
    if high - low < NOT_HU_RANGE and max(abs(low), abs(high)) < NOT_HU_RANGE and np.any(sample != np.rint(sample)):
        kept = len(np.unique(np.rint(sample)))
        warnings.warn(f"{out}: the values ({float(low):.3g} to {float(high):.3g} for 98 % of the voxels) do not "
                      f"look like HU; written as whole HU they keep only {kept} distinct values", CTGridItWarning,
                      stacklevel=3)


# ------------------------------------------------------------------ readers
def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, z) float32 HU, affine and on-disk dtype of a NIfTI file; the header checked before the voxels."""
    try:
        with _quiet_nibabel():
            img = nib.load(path, mmap=False)
    except Exception as exc:  # nibabel raises many types for a file that is not NIfTI
        raise _unreadable(path, exc) from exc
    header = img.header
    ndim = int(header["dim"][0])
    dims = tuple(int(d) for d in header["dim"][1:1 + max(ndim, 0)])
    if not 1 <= ndim <= 7 or min(dims, default=0) < 1:
        raise CTGridItError(f"the header gives impossible dimensions {dims}", path, "the file is damaged: export it again")
    dtype = img.get_data_dtype()
    if dtype.kind == "c":
        raise CTGridItError(f"has complex-valued voxels ({dtype})", path, "give a CT scan in HU (real values)")
    if dtype.kind == "V" or dtype.names:
        raise CTGridItError("is a colour (RGB) image", path, "give a CT scan in HU (one value per voxel)")
    shape = _volume_shape(img.shape, path)
    _check_nifti_size(path, header, dtype)
    zooms = _stored_voxel_sizes(path)                        # nibabel quietly turns a zero size into 1
    if np.any(zooms == 0) or not np.isfinite(zooms).all():
        raise CTGridItError(f"the header gives a zero or invalid voxel size (pixdim {zooms.tolist()})", path,
                            "fix the spacing in the header")
    if np.any(zooms < 0):
        warnings.warn(f"{path}: negative voxel sizes in the header (pixdim {zooms.tolist()}); their sizes are used",
                      CTGridItWarning, stacklevel=3)
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        warnings.warn(f"{path}: the header records no orientation (qform and sform codes 0): read as RAS with "
                      "the voxel sizes of pixdim and the origin at the first voxel", CTGridItWarning, stacklevel=3)
    try:
        with _quiet_nibabel():
            data = img.get_fdata(dtype=np.float32)
            affine = img.affine
    except MemoryError as err:
        raise _too_large(path, int(np.prod(shape))) from err
    except Exception as exc:  # EOFError, OSError, ValueError, zlib.error... for damaged data
        raise _damaged(path, exc) from exc
    return data.reshape(shape), affine, str(dtype)


def _stored_voxel_sizes(path: Path) -> np.ndarray:
    """``pixdim[1:4]`` as stored in the file (NIfTI-1 or NIfTI-2, either byte order)."""
    import gzip

    with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
        block = f.read(540)
    for order in "<>":
        size = struct.unpack(order + "i", block[:4])[0]
        if size == 348:
            return np.asarray(struct.unpack(order + "8f", block[76:108])[1:4], dtype=np.float64)
        if size == 540:
            return np.asarray(struct.unpack(order + "8d", block[104:168])[1:4], dtype=np.float64)
    raise CTGridItError("has no NIfTI header size (348 or 540)", path, "check the file")


def _check_nifti_size(path: Path, header, dtype: np.dtype) -> None:
    """The voxel data the header promises must be in the file (and fit in memory) before any is read."""
    shape = tuple(int(d) for d in header["dim"][1:1 + int(header["dim"][0])])
    voxels = int(np.prod(shape))
    promised = voxels * dtype.itemsize
    # the data follow the header and its 4-byte extension flag: at 352 (NIfTI-1) or 544 (NIfTI-2) at least
    first = 352 if int(header["sizeof_hdr"]) == 348 else 544
    offset = max(int(header["vox_offset"]) if "vox_offset" in header else first, first)
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:                      # gzip's last 4 bytes: the data size modulo 2**32
            f.seek(-4, os.SEEK_END)
            stored = int.from_bytes(f.read(4), "little")
        holds = stored - offset if promised + offset < 2**32 else None
    else:
        holds = path.stat().st_size - offset
    if holds is not None and holds < promised:
        raise CTGridItError(f"the header promises {' x '.join(map(str, shape))} {dtype} voxels "
                            f"({gigabytes(promised)}) but the file holds only {max(holds, 0):,} bytes of voxel data "
                            f"after its {offset}-byte header", path,
                            "the file is truncated or its header damaged: export it again")
    check_memory(voxels, path, shape=shape)


@contextlib.contextmanager
def _quiet_nibabel():
    """nibabel logs header oddities itself; ctgridit checks the header and says what matters as warnings."""
    logger = logging.getLogger("nibabel")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture what C++ libraries (ITK) print on the process's stderr; the lines end up in the yielded list."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(line.strip() for line in sink.read().decode("utf-8", "replace").splitlines() if line.strip())


def _too_large(path: Path, voxels: int) -> CTGridItError:
    return CTGridItError(f"is too large to read: {voxels:,} voxels need about {gigabytes(12 * voxels)} of memory",
                         path, "read it on a machine with more memory, or crop it")


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, z) float32 HU, RAS affine and on-disk dtype of an image SimpleITK reads (NRRD, MetaImage)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _captured_stderr() as said:
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, exc) from exc
    _itk_warnings(path, said)
    if reader.GetNumberOfComponents() != 1:
        raise CTGridItError(
            f"has {reader.GetNumberOfComponents()} values per voxel (a colour or vector image)", path, "give a CT scan in HU"
        )
    shape = _volume_shape(reader.GetSize(), path)
    if min(reader.GetSpacing()) <= 0:
        warnings.warn(f"{path}: non-positive voxel sizes in the header ({list(reader.GetSpacing())})",
                      CTGridItWarning, stacklevel=3)
    check_memory(int(np.prod(shape)), path, shape=shape)
    try:
        with _captured_stderr() as said:
            img = reader.Execute()
    except RuntimeError as err:
        detail = next((s for s in said if "ideal" in s or "not read completely" in s), None)
        numbers = re.findall(r"ideal = (\d+) : actual = (\d+)", " ".join(said))
        if numbers:
            ideal, actual = map(int, numbers[0])
            raise CTGridItError(f"truncated image data: the file holds {actual:,} of the {ideal:,} bytes its "
                                "header promises", path, "copy or export the file again") from err
        raise CTGridItError("truncated or corrupt image data" + (f" ({detail})" if detail else ""), path,
                            "copy or export the file again") from err
    _itk_warnings(path, said)
    stored = sitk.GetArrayViewFromImage(img)  # (..., z, y, x)
    data = stored.reshape(shape[::-1]).transpose(2, 1, 0).astype(np.float32)
    dim = img.GetDimension()
    direction = np.asarray(img.GetDirection()).reshape(dim, dim)[:3, :3]
    affine = CTVolume.affine_from_itk(img.GetSpacing()[:3], img.GetOrigin()[:3], direction)
    return data, affine, str(stored.dtype)


def _itk_warnings(path: Path, lines: list[str]) -> None:
    """What ITK printed while reading, as ctgridit warnings (one line each)."""
    for line in lines:
        warnings.warn(f"{path}: ITK: {line}", CTGridItWarning, stacklevel=4)


# ------------------------------------------------------------------- checks
def _volume_shape(shape, path: Path) -> tuple[int, int, int]:
    """The (x, y, z) shape of an image once trailing dimensions of size 1 are dropped; 2D and 4D are refused."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise CTGridItError(
            f"is a {len(shape)}D image (shape {shape}), not a single 3D CT volume", path, "extract one 3D volume first"
        )
    if len(shape) < 3 or min(shape) < 2:
        raise CTGridItError(f"is a 2D image (shape {shape}), not a CT volume", path, "give a 3D scan")
    return shape  # type: ignore[return-value]


def _warn_not_hu(array: np.ndarray, path: Path) -> None:
    """Say so when a scan holds no value below 0 HU: CT in HU has air (-1000) or at least fat (-100); values of 0
    and up look like a picture's grey levels or stored values without their rescale."""
    if array.size and float(array.min()) >= 0:
        warnings.warn(f"{path}: no voxel is below 0 (values {float(array.min()):.4g} to {float(array.max()):.4g}): "
                      "this does not look like CT in HU (air is -1000, fat -100); it is read as HU", CTGridItWarning,
                      stacklevel=3)


def _check_values(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Refuse NaN/Inf voxels and a voxel-to-world matrix that is not finite and invertible."""
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise CTGridItError(f"has {bad} NaN or infinite voxel values", path, "a CT scan holds finite HU; check the export")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CTGridItError("has a degenerate voxel-to-world matrix (zero voxel size?)", path, "fix the header's spacing and orientation")


def _straightened(affine: np.ndarray, path: Path) -> np.ndarray:
    """``affine`` with perpendicular voxel axes: a sheared one is replaced by the nearest perpendicular axes
    (same voxel sizes and origin) with a warning, so that every reader and writer agrees on the geometry."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    sizes = np.linalg.norm(columns, axis=0)
    directions = columns / sizes
    cosines = np.abs(directions.T @ directions - np.eye(3))
    if cosines.max() < SHEAR_TOLERANCE:
        return affine
    u, _, vt = np.linalg.svd(directions)
    straight = affine.copy()
    straight[:3, :3] = (u @ vt) * sizes
    degrees = float(np.degrees(np.arcsin(min(1.0, cosines.max()))))
    warnings.warn(f"{path}: the voxel axes are sheared (up to {degrees:.1f} degrees from perpendicular); "
                  "read with the nearest perpendicular axes, voxel sizes and origin kept", CTGridItWarning,
                  stacklevel=3)
    return straight


def _unreadable(path: Path, exc: Exception | None = None) -> CTGridItError:
    """The error for a file that is not an image ctgridit reads (a lone DICOM slice gets its own hint)."""
    if _is_dicom_file(path):
        return CTGridItError("is a single DICOM file", path, "give the folder that holds the whole series, or a .zip of it")
    detail = f" [{type(exc).__name__}: {exc}]" if exc is not None else ""
    return CTGridItError(f"not a readable CT image (supported: {SUPPORTED}){detail}", path, "check the file and its extension")


def _is_dicom_file(path: Path) -> bool:
    try:
        return pydicom.misc.is_dicom(path)
    except OSError:
        return False


def _damaged(path: Path, exc: Exception) -> CTGridItError:
    """The error for an image whose header reads but whose voxel data does not."""
    return CTGridItError(
        f"truncated or corrupt image data ({type(exc).__name__}: {exc})", path, "copy or export the file again"
    )
