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

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

from ctgridit.ct.dicom import read_dicom_series, read_dicom_zip
from ctgridit.ct.volume import CTVolume
from ctgridit.errors import CTGridItError
from ctgridit.files import atomic_output, check_output_path

HU_INT16_MIN, HU_INT16_MAX = -32768, 32767
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
    if p.is_dir():
        return read_dicom_series(p, series_uid)
    name = p.name.lower()
    if name.endswith(".zip"):
        return read_dicom_zip(p, series_uid)
    if series_uid is not None:
        raise CTGridItError("a series UID only applies to a DICOM folder or zip", p, "leave out the series UID")
    if name.endswith(NIFTI_SUFFIXES):
        array, affine, dtype = _read_nifti(p)
    elif name.endswith(ITK_SUFFIXES):
        array, affine, dtype = _read_itk(p)
    else:
        raise _unreadable(p)
    _check_values(array, affine, p)
    return CTVolume(array, affine, source=str(p), source_dtype=dtype)


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


# ------------------------------------------------------------------ readers
def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, z) float32 HU, affine and on-disk dtype of a NIfTI file."""
    try:
        img = nib.load(path, mmap=False)
    except Exception as exc:  # nibabel raises many types for a file that is not NIfTI
        raise _unreadable(path, exc) from exc
    shape = _volume_shape(img.shape, path)
    try:
        data = img.get_fdata(dtype=np.float32)
    except Exception as exc:  # EOFError, OSError, ValueError, zlib.error... for damaged data
        raise _damaged(path, exc) from exc
    return data.reshape(shape), img.affine, str(img.get_data_dtype())


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, z) float32 HU, RAS affine and on-disk dtype of an image SimpleITK reads (NRRD, MetaImage)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, exc) from exc
    if reader.GetNumberOfComponents() != 1:
        raise CTGridItError(
            f"has {reader.GetNumberOfComponents()} values per voxel (a colour or vector image)", path, "give a CT scan in HU"
        )
    shape = _volume_shape(reader.GetSize(), path)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise _damaged(path, exc) from exc
    stored = sitk.GetArrayViewFromImage(img)  # (..., z, y, x)
    data = stored.reshape(shape[::-1]).transpose(2, 1, 0).astype(np.float32)
    dim = img.GetDimension()
    direction = np.asarray(img.GetDirection()).reshape(dim, dim)[:3, :3]
    affine = CTVolume.affine_from_itk(img.GetSpacing()[:3], img.GetOrigin()[:3], direction)
    return data, affine, str(stored.dtype)


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


def _check_values(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Refuse NaN/Inf voxels and a voxel-to-world matrix that is not finite and invertible."""
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise CTGridItError(f"has {bad} NaN or infinite voxel values", path, "a CT scan holds finite HU; check the export")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CTGridItError("has a degenerate voxel-to-world matrix (zero voxel size?)", path, "fix the header's spacing and orientation")


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
