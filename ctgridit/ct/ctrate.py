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
and the origin. Each item goes through :func:`~ctgridit.ct.transforms.ctrate_preprocess`
(or the given transform): HU, LPS, 0.75 x 0.75 x 1.5 mm, window to [-1, 1],
in-plane 512 x 512.
"""

from __future__ import annotations

import ast
import csv
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from monai.transforms import Compose
from torch.utils.data import Dataset

from ctgridit.errors import CTGridItError, CTGridItWarning
from ctgridit.ct.transforms import INTERCEPT_KEY, SLOPE_KEY, SPACING_KEY, LoadCTd, SetSpacingd, ctrate_preprocess

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
                            "RescaleSlope, RescaleIntercept and ZSpacing are numbers") from None


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
    ``transform``, by default :func:`~ctgridit.ct.transforms.ctrate_preprocess`.
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
