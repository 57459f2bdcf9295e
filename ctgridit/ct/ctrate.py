"""CT-RATE as a torch Dataset: NIfTI volumes plus the metadata CSV that makes them HU.

A CT-RATE folder holds NIfTI files nested by patient and scan
(``train/train_1/train_1_a/train_1_a_1.nii.gz``) and a metadata CSV with one
row per volume. The files store raw values; the CSV says how to read them:

- ``VolumeName``: the file name, found anywhere under the root;
- ``RescaleSlope``, ``RescaleIntercept``: ``HU = slope * raw + intercept``;
- ``XYSpacing`` (a string like ``"[0.75, 0.75]"``, x then y) and
  ``ZSpacing``: the voxel size in mm along the stored array axes.

CT-RATE's NIfTI headers are unreliable (their spacing is often wrong), so the
CSV spacing replaces the header's; the header only gives the axis directions
and the origin. Each item goes through :func:`ctrate_preprocess`
(or the given transform): HU, LPS, 0.75 x 0.75 x 1.5 mm, window to [-1, 1],
in-plane 512 x 512.
"""

from __future__ import annotations

import ast
import csv
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.transforms import Compose
from torch.utils.data import Dataset

from ctgridit.ct.transforms import (CANONICAL_AXCODES, HU_AIR, INTERCEPT_KEY, SLOPE_KEY, SPACING_KEY, HUWindowd, LoadCTd,
                                   Orientd, RescaleToHUd, ResampleToSpacingd, SetSpacingd, crop_or_pad_in_plane_d)
from ctgridit.ct.window import DEFAULT_WINDOW, MODEL_RANGE, window_hu
from ctgridit.errors import CTGridItError, CTGridItWarning

#: CT-RATE's voxel size (x, y, z) in mm and in-plane size in voxels (docs/METHOD.md section 1).
CTRATE_SPACING = (0.75, 0.75, 1.5)
CTRATE_IN_PLANE = 512


def ctrate_preprocess(keys: KeysCollection = "image", spacing: Sequence[float] = CTRATE_SPACING,
                      spatial_size: int | Sequence[int] = CTRATE_IN_PLANE, window: Sequence[float] = DEFAULT_WINDOW,
                      pad_hu: float = HU_AIR, slope_key: str = SLOPE_KEY,
                      intercept_key: str = INTERCEPT_KEY) -> Compose:
    """CT-RATE preprocessing (docs/METHOD.md section 1) as one dictionary :class:`~monai.transforms.Compose`.

    On a data dict whose ``keys`` hold raw ``(1, X, Y, Z)`` MetaTensors and whose
    ``slope_key`` / ``intercept_key`` hold the rescale of each item:
    HU = slope * raw + intercept -> orient LPS -> resample to ``spacing`` mm
    (trilinear) -> clip to ``window`` HU and scale to [-1, 1] -> centre crop /
    pad in-plane to ``spatial_size`` with air (``pad_hu``, windowed).

    ``Compose.inverse`` maps the result back to HU on the original grid: the
    crop/pad, window, resampling and orientation are undone; the HU rescale is
    not (see :class:`~ctgridit.ct.transforms.RescaleToHU`); HU outside the window and cropped borders
    are lost (see :class:`~ctgridit.ct.transforms.HUWindow`, :func:`~ctgridit.ct.transforms.crop_or_pad_in_plane`).
    """
    pad_value = float(window_hu(torch.tensor(pad_hu), window, MODEL_RANGE))
    return Compose([
        RescaleToHUd(keys, slope_key=slope_key, intercept_key=intercept_key),
        Orientd(keys, axcodes=CANONICAL_AXCODES),
        ResampleToSpacingd(keys, spacing=spacing),
        HUWindowd(keys, window=window, output_range=MODEL_RANGE),
        crop_or_pad_in_plane_d(keys, spatial_size=spatial_size, pad_value=pad_value),
    ])


#: The metadata columns the dataset needs.
CSV_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")
IMAGE_KEY, NAME_KEY = "image", "name"


@dataclass(frozen=True)
class CTRateRecord:
    """One volume of the metadata CSV found on disk."""

    name: str
    path: Path
    slope: float
    intercept: float
    spacing: tuple[float, float, float]  # mm along the stored array axes (x, y, z)


def read_metadata(metadata_csv: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CT-RATE metadata CSV, checked for the :data:`CSV_COLUMNS`."""
    path = Path(metadata_csv)
    if not path.is_file():
        raise CTGridItError("metadata CSV not found", path, "pass the CT-RATE metadata CSV (e.g. train_metadata.csv)")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CTGridItError(f"metadata CSV lacks the column(s) {', '.join(missing)}", path,
                                f"a CT-RATE metadata CSV has the columns {', '.join(CSV_COLUMNS)}")
        return list(reader)


def parse_record(row: dict[str, str], path: Path) -> CTRateRecord:
    """A :class:`CTRateRecord` from one CSV row whose volume lies at ``path``."""
    name = row["VolumeName"]
    try:
        x, y = (float(v) for v in ast.literal_eval(row["XYSpacing"].strip()))
        return CTRateRecord(name, path, float(row["RescaleSlope"]), float(row["RescaleIntercept"]),
                            (x, y, float(row["ZSpacing"])))
    except (ValueError, TypeError, SyntaxError) as err:
        raise CTGridItError(f"bad metadata for {name}: {err}", hint="XYSpacing is like \"[0.75, 0.75]\"; "
                            "RescaleSlope, RescaleIntercept and ZSpacing are numbers") from err


def find_files(root: Path, names: set[str]) -> dict[str, Path]:
    """The files under ``root`` (recursively, in sorted order) whose name is in ``names``; the first one wins."""
    found: dict[str, Path] = {}
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(set(files) & names):
            found.setdefault(name, Path(folder) / name)
    return found


def find_records(root: str | os.PathLike, metadata_csv: str | os.PathLike) -> list[CTRateRecord]:
    """The CSV's volumes that exist under ``root``, in CSV order; warns once about the missing ones."""
    root = Path(root)
    if not root.is_dir():
        raise CTGridItError("CT-RATE folder not found", root, "pass the folder that holds the volumes")
    rows = read_metadata(metadata_csv)
    if not rows:
        raise CTGridItError("metadata CSV lists no volumes", metadata_csv)
    files = find_files(root, {row["VolumeName"] for row in rows})
    records = [parse_record(row, files[row["VolumeName"]]) for row in rows if row["VolumeName"] in files]
    if not records:
        raise CTGridItError(f"none of the {len(rows)} volumes of {metadata_csv} is under this folder", root,
                            "check the folder and that VolumeName matches the file names")
    if len(records) < len(rows):
        warnings.warn(f"{len(rows) - len(records)} of the {len(rows)} volumes listed in {metadata_csv} "
                      f"were not found under {root}; skipped", CTGridItWarning, stacklevel=2)
    return records


class CTRateDataset(Dataset):
    """A torch Dataset over a CT-RATE folder (see the module docstring).

    Item ``i`` is the data dict of the ``i``-th volume found: it is read with
    :class:`~ctgridit.ct.transforms.LoadCTd` as raw values, given the CSV
    spacing (:class:`~ctgridit.ct.transforms.SetSpacingd`) and passed through
    ``transform``, by default :func:`ctrate_preprocess`.
    A custom transform receives ``{"image": raw (1, X, Y, Z) MetaTensor,
    "name", "slope", "intercept", "spacing"}`` and must apply the rescale
    itself (e.g. with :class:`~ctgridit.ct.transforms.RescaleToHUd`). With the
    default, ``item["image"]`` is a ``(1, 512, 512, Z)`` MetaTensor in [-1, 1]
    and ``item["name"]`` the VolumeName; ``transform.inverse(item)`` maps it back
    to HU on the file's grid.
    """

    def __init__(self, root: str | os.PathLike, metadata_csv: str | os.PathLike,
                 transform: Callable[[dict], dict] | None = None) -> None:
        self.records = find_records(root, metadata_csv)
        self.load = Compose([LoadCTd(IMAGE_KEY), SetSpacingd(IMAGE_KEY, spacing_key=SPACING_KEY)])
        self.transform = ctrate_preprocess(keys=IMAGE_KEY) if transform is None else transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        data = {IMAGE_KEY: record.path, NAME_KEY: record.name, SLOPE_KEY: record.slope,
                INTERCEPT_KEY: record.intercept, SPACING_KEY: record.spacing}
        return self.transform(self.load(data))
