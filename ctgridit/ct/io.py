"""Reading CT volumes (HU + geometry) from disk and writing them as NIfTI.

This first version reads NIfTI only; other formats are added on top of
:func:`read_ct`, which is the single entry point.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ctgridit.errors import CTGridItError
from ctgridit.files import atomic_output
from ctgridit.ct.volume import CTVolume

HU_INT16_MIN, HU_INT16_MAX = -32768, 32767


def read_ct(path: str | os.PathLike, series_uid: str | None = None) -> CTVolume:
    """Read a CT volume in HU with its geometry."""
    p = Path(path)
    if not p.exists():
        raise CTGridItError("no such file or folder", p, "check the path")
    img = nib.load(str(p))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return CTVolume(data, img.affine, source=str(p), source_dtype=str(img.get_data_dtype()))


def write_nifti(volume: CTVolume, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``volume`` as int16 HU NIfTI, atomically, with qform and sform both set."""
    data = np.clip(np.rint(volume.array), HU_INT16_MIN, HU_INT16_MAX).astype(np.int16)
    img = nib.Nifti1Image(data, volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_output(path, force=force) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
