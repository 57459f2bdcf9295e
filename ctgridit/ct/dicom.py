"""Reading one CT series from a folder (or a ``.zip``) of DICOM slices.

Conventions
-----------
- Every file under the folder is looked at, recursively. Files that are not
  DICOM (``.txt``, ``.DS_Store``...) are skipped quietly, and so are DICOM
  files that are not image slices (DICOMDIR, structured reports, localizers):
  an image slice has ImagePositionPatient, ImageOrientationPatient, Rows and
  Columns (the image pixel module, which comes with PixelData). Headers are
  read first without the pixels (``stop_before_pixels``); only the slices of
  the chosen series are decoded, and one without decodable PixelData is an
  error.
- Slices are grouped by SeriesInstanceUID. Anonymised series may have an empty
  UID: it counts as one series, shown as ``(no UID)``. Without ``series_uid``
  the series with most slices is read (with a warning when there are others).
- Voxel axes: ``i`` runs along the row direction of ImageOrientationPatient
  (its first three cosines: the direction in which the column index grows),
  ``j`` along the column direction (its last three cosines), ``k`` along the
  slice normal ``n = row x column``. PixelSpacing is ``[row spacing, column
  spacing]`` = ``[mm between rows (along j), mm between columns (along i)]``.
- Slices are sorted by the projection of ImagePositionPatient on ``n``
  (ascending), never by InstanceNumber. Slices at the same position are
  dropped (the first by file name is kept) with a warning.
- HU = RescaleSlope * stored value + RescaleIntercept, per slice (defaults 1
  and 0). pydicom decodes the pixels; a slice that pydicom cannot decode is
  read with ``SimpleITK.ReadImage``, which applies the rescale itself.
- The geometry is built in DICOM's LPS frame and converted to the RAS affine of
  :class:`~ctgridit.ct.volume.CTVolume` with ``CTVolume.affine_from_itk``.
- Irregular series are made regular, with a :class:`CTGridItWarning`:

  * gantry tilt (slice origins that move in-plane from slice to slice): every
    slice is shifted in-plane (linear interpolation, ``scipy.ndimage.shift``)
    onto a common in-plane grid, placed at the mean in-plane offset of the
    slices; voxels that come from outside a slice get the series' lowest HU;
  * slice gaps that differ by more than 1% from their median (missing slices,
    variable spacing): the volume is resampled along ``n`` with linear
    interpolation between the two neighbouring slices, to the median gap
    adjusted so that the grid runs exactly from the first slice to the last.

  The result always has orthogonal axes ``(row, column, n)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from ctgridit.ct.volume import CTVolume
from ctgridit.errors import CTGridItError, CTGridItWarning
from ctgridit.limits import MAX_ZIP_BYTES, MAX_ZIP_FILES, MAX_ZIP_RATIO, check_memory, gigabytes

NO_UID_LABEL = "(no UID)"
#: Gaps that differ from the median gap by more than this fraction make the series irregular.
GAP_TOLERANCE = 0.01
#: In-plane offsets of slice origins above this fraction of a pixel are treated as gantry tilt.
TILT_TOLERANCE_PX = 0.05
#: Slices closer than this along the normal (mm) are at the same position.
DUPLICATE_MM = 0.01

_HINT = "give a folder (or a .zip) of single-frame CT DICOM slices"


@dataclass(frozen=True)
class _Slice:
    """The header facts of one image slice that the reader needs."""

    path: Path
    name: str  # path relative to the series root, for messages
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient, 6 direction cosines
    size: tuple[int, int]  # (Rows, Columns)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    slope: float
    intercept: float
    gantry_tilt: float  # GantryDetectorTilt, degrees
    stored_dtype: str
    description: str = ""  # SeriesDescription
    kernel: str = ""  # ConvolutionKernel


def uid_label(uid: str) -> str:
    """How a SeriesInstanceUID is shown to the user: the empty UID is ``(no UID)``."""
    return uid if uid else NO_UID_LABEL


def read_dicom_zip(path: str | os.PathLike, series_uid: str | None = None) -> CTVolume:
    """Read a CT series from a ``.zip`` of DICOM files (at its top level or in subfolders).

    The zip is extracted to a temporary folder that is removed afterwards, even
    on error. Messages name the zip, not the temporary folder.
    """
    source = Path(path)
    with tempfile.TemporaryDirectory(prefix="ctgridit-dicom-") as tmp:
        _extract_zip(source, Path(tmp))
        return read_dicom_series(tmp, series_uid, source=source)


def read_dicom_series(
    folder: str | os.PathLike, series_uid: str | None = None, source: str | os.PathLike | None = None
) -> CTVolume:
    """Read one CT series of a DICOM folder as a regular volume in HU (see the module conventions).

    ``series_uid`` picks a series (``""`` or ``"(no UID)"`` for the empty UID);
    ``source`` is the path named in messages and in ``CTVolume.source``
    (default: ``folder``).
    """
    root = Path(folder)
    shown = Path(source) if source is not None else root
    series = _scan_series(root, shown)
    uid, slices = _choose_series(series, series_uid, shown)
    slices = _sorted_unique(slices, shown)
    _check_consistent(slices, shown)
    array = _load_hu(slices, shown)
    volume = _regular_volume(array, slices, shown)
    volume.source = str(shown)
    volume.source_dtype = slices[0].stored_dtype
    volume.series_uid = uid
    volume.notes.insert(0, f"DICOM series {uid_label(uid)}: {len(slices)} slices read from {shown}")
    return volume


# ---------------------------------------------------------------- zip files
def _extract_zip(path: Path, target: Path) -> None:
    """Extract ``path`` into ``target`` (zipfile drops absolute paths and ``..``).

    The zip's directory is checked first: too many files, too many bytes once
    extracted (or more than the free space), or a compression ratio only a
    zip bomb has, are refused before anything is written.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            size = sum(m.file_size for m in members)
            packed = max(1, sum(m.compress_size for m in members))
            free = shutil.disk_usage(target).free
            if len(members) > MAX_ZIP_FILES:
                raise CTGridItError(f"holds {len(members):,} files (at most {MAX_ZIP_FILES:,})", path,
                                    "zip one DICOM series")
            if size > MAX_ZIP_BYTES or size / packed > MAX_ZIP_RATIO or size > free:
                raise CTGridItError(f"would extract to {gigabytes(size)} from {gigabytes(packed)} (at most "
                                    f"{gigabytes(MAX_ZIP_BYTES)}, {MAX_ZIP_RATIO}x, and {gigabytes(free)} are free)",
                                    path, "zip one DICOM series, or extract it yourself and give the folder")
            archive.extractall(target)
    except zipfile.BadZipFile as exc:
        raise CTGridItError(f"not a valid zip file ({exc})", path, "give an intact .zip of a DICOM folder") from exc
    except (OSError, EOFError, zlib.error, RuntimeError, NotImplementedError) as exc:
        raise CTGridItError(f"zip cannot be extracted ({exc})", path, "re-create the zip (unencrypted, deflate or store)") from exc


# ------------------------------------------------------------ header scan
def _scan_series(root: Path, shown: Path) -> dict[str, list[_Slice]]:
    """All image slices under ``root`` grouped by SeriesInstanceUID."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise CTGridItError("holds no files", shown, _HINT)
    series: dict[str, list[_Slice]] = {}
    for path in files:
        name = path.relative_to(root).as_posix()
        header = _read_header(path, name)
        if header is None or not _is_image_slice(header):
            continue
        uid = str(header.get("SeriesInstanceUID", "") or "").strip()
        series.setdefault(uid, []).append(_slice_from_header(path, name, header, shown))
    if not series:
        raise CTGridItError(f"holds no DICOM image slices (looked at {len(files)} files)", shown, _HINT)
    return series


def _read_header(path: Path, name: str) -> pydicom.Dataset | None:
    """The header of a DICOM file, or None for a file that is not DICOM (quietly) or is unreadable (warning)."""
    try:
        with warnings.catch_warnings():  # odd values in files we may skip anyway
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except Exception as exc:  # a damaged DICOM file can fail in many ways inside pydicom
        warnings.warn(f"skipped {name}: not a readable DICOM file ({exc})", CTGridItWarning, stacklevel=4)
        return None


def _is_image_slice(header: pydicom.Dataset) -> bool:
    required = ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns")
    if any(header.get(name) is None for name in required):
        return False
    return "LOCALIZER" not in [str(v).upper() for v in header.get("ImageType", [])]


def _slice_from_header(path: Path, name: str, header: pydicom.Dataset, shown: Path) -> _Slice:
    try:
        position = np.array([float(v) for v in header.ImagePositionPatient], dtype=np.float64)
        orientation = np.array([float(v) for v in header.ImageOrientationPatient], dtype=np.float64)
        spacing = header.get("PixelSpacing")
        if spacing is None:
            raise ValueError("no PixelSpacing")
        pixel_spacing = (float(spacing[0]), float(spacing[1]))
        slope = float(header.get("RescaleSlope", 1) or 1)
        intercept = float(header.get("RescaleIntercept", 0) or 0)
        tilt = float(header.get("GantryDetectorTilt", 0) or 0)
        signed = int(header.get("PixelRepresentation", 0) or 0) == 1
        bits = int(header.get("BitsAllocated", 16) or 16)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        rows, columns = int(header.Rows), int(header.Columns)
    except (ValueError, TypeError, IndexError) as exc:
        raise CTGridItError(f"slice {name} has an invalid geometry header ({exc})", shown, _HINT) from exc
    if position.shape != (3,) or orientation.shape != (6,) or min(pixel_spacing) <= 0:
        raise CTGridItError(f"slice {name} has an invalid ImagePositionPatient, ImageOrientationPatient or PixelSpacing", shown, _HINT)
    if min(rows, columns) < 1:
        raise CTGridItError(f"slice {name} has {rows} x {columns} pixels", shown, _HINT)
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and not syntax.is_compressed:                # the file must hold what the header promises
        promised = rows * columns * samples * max(1, bits // 8)
        if promised > path.stat().st_size:
            raise CTGridItError(f"slice {name} claims {rows} x {columns} pixels ({promised:,} bytes), more than its "
                                f"file holds ({path.stat().st_size:,} bytes)", shown, "the header is damaged: export the series again")
    kernel = header.get("ConvolutionKernel", "")
    return _Slice(
        path=path,
        name=name,
        position=position,
        orientation=orientation,
        size=(int(header.Rows), int(header.Columns)),
        pixel_spacing=pixel_spacing,
        slope=slope,
        intercept=intercept,
        gantry_tilt=tilt,
        stored_dtype=f"{'int' if signed else 'uint'}{bits}",
        description=str(header.get("SeriesDescription", "") or "").strip(),
        kernel=" ".join(str(k) for k in kernel) if isinstance(kernel, (list, pydicom.multival.MultiValue)) else str(kernel or "").strip(),
    )


# ------------------------------------------------------- series selection
def _choose_series(
    series: dict[str, list[_Slice]], series_uid: str | None, shown: Path
) -> tuple[str, list[_Slice]]:
    """The requested series, or the one with most slices (warning when there are others)."""
    if series_uid is not None:
        uid = "" if series_uid.strip() in ("", NO_UID_LABEL) else series_uid.strip()
        if uid not in series:
            available = "; ".join(_series_label(u, s) for u, s in _by_size(series))
            raise CTGridItError(f"no series with UID {uid_label(uid)}", shown, f"available series: {available}")
        return uid, series[uid]
    (uid, slices), *others = _by_size(series)
    tied = [(u, s) for u, s in others if len(s) == len(slices)]
    if tied:
        listed = "; ".join(_series_label(u, s) for u, s in [(uid, slices), *tied])
        raise CTGridItError(f"holds {len(tied) + 1} series with {len(slices)} slices each ({listed})", shown,
                            "choose one with --series UID")
    if others:
        warnings.warn(
            f"{shown}: found {len(series)} series; reading {_series_label(uid, slices)}, ignoring "
            f"{'; '.join(_series_label(u, s) for u, s in others)}; choose another with --series UID",
            CTGridItWarning,
            stacklevel=3,
        )
    check_memory(sum(s.size[0] * s.size[1] for s in slices), shown, "the series",
                 shape=(*slices[0].size, len(slices)))
    return uid, slices


def _series_label(uid: str, slices: list[_Slice]) -> str:
    """``UID ("description", kernel K, N slices)`` for messages."""
    first = slices[0]
    facts = [f'"{first.description}"'] if first.description else []
    facts += [f"kernel {first.kernel}"] if first.kernel else []
    return f"{uid_label(uid)} ({', '.join(facts + [f'{len(slices)} slices'])})"


def _by_size(series: dict[str, list[_Slice]]) -> list[tuple[str, list[_Slice]]]:
    """Series from most to fewest slices (ties by UID, so the choice is reproducible)."""
    return sorted(series.items(), key=lambda item: (-len(item[1]), item[0]))


# -------------------------------------------------------- sorting, checks
def _axes(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row, column and normal directions (LPS) of an ImageOrientationPatient."""
    row = orientation[:3] / np.linalg.norm(orientation[:3])
    col = orientation[3:] / np.linalg.norm(orientation[3:])
    return row, col, np.cross(row, col)


def _sorted_unique(slices: list[_Slice], shown: Path) -> list[_Slice]:
    """Slices sorted along the normal, one per position; a single slice is refused."""
    _, _, normal = _axes(slices[0].orientation)
    ordered = sorted(slices, key=lambda s: (float(s.position @ normal), s.name))
    unique = [ordered[0]]
    for sl in ordered[1:]:
        if float((sl.position - unique[-1].position) @ normal) > DUPLICATE_MM:
            unique.append(sl)
    if len(unique) < len(ordered):
        warnings.warn(
            f"{shown}: {len(ordered) - len(unique)} slices repeat the position of another slice; "
            "kept one slice per position (the first by file name)",
            CTGridItWarning,
            stacklevel=3,
        )
    if len(unique) < 2:
        raise CTGridItError("has a single image slice (a 2D image), not a CT volume", shown, "give a folder with the whole series")
    return unique


def _check_consistent(slices: list[_Slice], shown: Path) -> None:
    """Refuse a series whose slices do not share size, orientation and pixel spacing."""
    sizes = Counter(sl.size for sl in slices)
    if len(sizes) > 1:
        found = ", ".join(f"{r}x{c} in {n} slices" for (r, c), n in sizes.most_common())
        raise CTGridItError(f"mixed image sizes in the series ({found})", shown, "give a folder with one series")
    first = slices[0]
    if any(not np.allclose(sl.orientation, first.orientation, atol=1e-4) for sl in slices):
        raise CTGridItError("slices have different orientations (ImageOrientationPatient)", shown, "give a folder with one series")
    if any(not np.allclose(sl.pixel_spacing, first.pixel_spacing, rtol=1e-4) for sl in slices):
        raise CTGridItError("slices have different PixelSpacing", shown, "give a folder with one series")
    row, col, _ = _axes(first.orientation)
    if abs(float(row @ col)) > 1e-3:
        raise CTGridItError("ImageOrientationPatient row and column directions are not orthogonal", shown, _HINT)


# ------------------------------------------------------------------ pixels
def _load_hu(slices: list[_Slice], shown: Path) -> np.ndarray:
    """The sorted slices as a float32 HU array indexed ``[i, j, k]``."""
    rows, cols = slices[0].size
    array = np.empty((cols, rows, len(slices)), dtype=np.float32)
    for k, sl in enumerate(slices):
        array[:, :, k] = _slice_hu(sl, shown).T  # (rows, columns) = (j, i) -> (i, j)
    if not np.isfinite(array).all():
        raise CTGridItError("has NaN or infinite voxel values", shown, "check the export of the series")
    return array


def _slice_hu(sl: _Slice, shown: Path) -> np.ndarray:
    """One slice in HU, shape ``(Rows, Columns)``: pydicom first, SimpleITK as the fallback."""
    try:
        with warnings.catch_warnings():  # a slice either decodes or fails below: pydicom's chatter is noise
            warnings.simplefilter("ignore")
            stored = pydicom.dcmread(sl.path).pixel_array
        hu = stored.astype(np.float64) * sl.slope + sl.intercept
    except Exception as pydicom_error:  # any decoding failure: let SimpleITK try this slice
        try:
            hu = sitk.GetArrayFromImage(sitk.ReadImage(str(sl.path))).astype(np.float64)  # rescaled by ITK
        except RuntimeError:
            raise CTGridItError(
                f"slice {sl.name} cannot be decoded ({type(pydicom_error).__name__}: {pydicom_error})",
                shown,
                "check that the file is complete, or install a decoder for its transfer syntax",
            ) from pydicom_error
    if hu.size != sl.size[0] * sl.size[1]:
        raise CTGridItError(
            f"slice {sl.name} has pixel data of shape {hu.shape}, not {sl.size[0]}x{sl.size[1]} (multi-frame or colour image?)",
            shown,
            _HINT,
        )
    return hu.reshape(sl.size)


# ----------------------------------------------------------------- geometry
def _regular_volume(array: np.ndarray, slices: list[_Slice], shown: Path) -> CTVolume:
    """Place the stacked slices on a regular grid with axes (row, column, normal)."""
    row, col, normal = _axes(slices[0].orientation)
    row_spacing, col_spacing = slices[0].pixel_spacing
    pixel = np.array([col_spacing, row_spacing])  # mm per voxel along i and j
    positions = np.stack([sl.position for sl in slices])
    offsets = positions - positions[0]
    in_plane = np.stack([offsets @ row, offsets @ col], axis=1)  # mm along i and j
    heights = offsets @ normal  # mm along the normal, ascending, heights[0] == 0
    notes: list[str] = []

    array, centre = _untilt(array, in_plane, heights, pixel, slices[0].gantry_tilt, shown, notes)
    array, slice_spacing = _even_out_gaps(array, heights, shown, notes)

    origin = positions[0] + centre[0] * row + centre[1] * col
    direction = np.stack([row, col, normal], axis=1)  # columns: directions of i, j, k (LPS)
    affine = CTVolume.affine_from_itk((col_spacing, row_spacing, slice_spacing), origin, direction.ravel())
    return CTVolume(np.ascontiguousarray(array, dtype=np.float32), affine, notes=notes)


def _untilt(
    array: np.ndarray,
    in_plane: np.ndarray,
    heights: np.ndarray,
    pixel: np.ndarray,
    tag_tilt: float,
    shown: Path,
    notes: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Shift the slices onto a common in-plane grid when their origins drift in-plane (gantry tilt).

    Returns the array and the in-plane offset (mm along i, j) of the common
    grid from the first slice's origin: the mean offset of the slices, so that
    no slice moves more than needed.
    """
    if np.abs(in_plane / pixel).max() <= TILT_TOLERANCE_PX:
        if tag_tilt:
            notes.append(
                _warn(
                    f"{shown}: GantryDetectorTilt is {tag_tilt:g} degrees but the slice positions show no "
                    "in-plane shift; the slices are placed where their positions say"
                )
            )
        return array, np.zeros(2)
    centre = in_plane.mean(axis=0)
    drift = (heights @ in_plane) / (heights @ heights)  # least-squares mm in-plane per mm along the normal
    angle = float(np.degrees(np.arctan(np.linalg.norm(drift))))
    tag = f"; GantryDetectorTilt says {tag_tilt:g} degrees" if tag_tilt else ""
    notes.append(
        _warn(
            f"{shown}: gantry tilt of {angle:.1f} degrees (slice origins move up to "
            f"{np.linalg.norm(in_plane, axis=1).max():.3g} mm in-plane{tag}); "
            "resampled onto an orthogonal grid (linear interpolation)"
        )
    )
    return _shift_in_plane(array, (in_plane - centre) / pixel), centre


def _shift_in_plane(array: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Shift slice ``k`` by ``shifts[k]`` voxels (i, j): ``out[i, j] = in[i - di, j - dj]``, linear.

    Voxels that come from outside a slice get the lowest value of the array.
    """
    fill = float(array.min())
    out = np.empty_like(array)
    for k in range(array.shape[2]):
        out[:, :, k] = ndimage.shift(array[:, :, k], shifts[k], order=1, mode="constant", cval=fill, prefilter=False)
    return out


def _even_out_gaps(array: np.ndarray, heights: np.ndarray, shown: Path, notes: list[str]) -> tuple[np.ndarray, float]:
    """The array on evenly spaced slices, and the slice spacing (mm).

    Gaps within 1% of their median are kept as they are (spacing: the mean
    gap); otherwise the slices are resampled to the median gap, adjusted so
    that the grid runs exactly from the first slice to the last.
    """
    gaps = np.diff(heights)
    median = float(np.median(gaps))
    if np.abs(gaps - median).max() <= GAP_TOLERANCE * median:
        return array, float(heights[-1] / (len(heights) - 1))
    count = int(round(float(heights[-1]) / median)) + 1
    targets = np.linspace(0.0, heights[-1], count)
    resampled = _interpolate_slices(array, heights, targets)
    spacing = float(targets[1] - targets[0])
    missing = " (missing slices?)" if gaps.max() > 1.5 * median else ""
    notes.append(
        _warn(
            f"{shown}: slice gaps vary from {gaps.min():.4g} to {gaps.max():.4g} mm{missing}; "
            f"resampled to a uniform {spacing:.4g} mm along the slice normal (median gap, linear interpolation)"
        )
    )
    return resampled, spacing


def _interpolate_slices(array: np.ndarray, heights: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Slices at ``targets``, interpolated linearly between the two source slices around each."""
    position = np.interp(targets, heights, np.arange(len(heights)))
    lower = np.minimum(np.floor(position).astype(int), len(heights) - 2)
    weight = (position - lower).astype(np.float32)
    return array[:, :, lower] * (1 - weight) + array[:, :, lower + 1] * weight


def _warn(message: str) -> str:
    """Emit ``message`` as a CTGridItWarning and return it for the volume's notes."""
    warnings.warn(message, CTGridItWarning, stacklevel=5)
    return message
