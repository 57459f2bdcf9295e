"""The in-memory CT volume: HU voxels plus the geometry that places them in the patient.

Conventions (those of nibabel and NIfTI):

- ``array`` is indexed ``[i, j, k]`` = ``(x, y, z)`` voxel order, float32 HU;
- ``affine`` maps a voxel index ``(i, j, k, 1)`` to world millimetres in the
  RAS+ frame (+x towards the patient's Right, +y Anterior, +z Superior).

ITK/SimpleITK/DICOM use the LPS+ frame; :meth:`CTVolume.itk_geometry` and
:meth:`CTVolume.affine_from_itk` convert, so that every library agrees on
where each voxel is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import nibabel as nib
import numpy as np

#: RAS <-> LPS: flip the sign of the first two world axes.
LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with its voxel-to-world geometry."""

    array: np.ndarray
    affine: np.ndarray
    source: str | None = None
    source_dtype: str | None = None
    series_uid: str | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    # ----------------------------------------------------------------- geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes (i, j, k)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin_ras(self) -> tuple[float, float, float]:
        """World position (RAS mm) of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes in the nibabel sense, e.g. ``"LPS"``: i grows towards L, j towards P, k towards S."""
        return "".join(nib.aff2axcodes(self.affine))

    def itk_geometry(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """``(spacing, origin, direction)`` in ITK's LPS convention (direction row-major 3x3)."""
        lps = LPS_FLIP @ self.affine
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = lps[:3, :3] / spacing
        return tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple(direction.ravel().tolist())

    @staticmethod
    def affine_from_itk(spacing, origin, direction) -> np.ndarray:
        """The RAS affine of an ITK image geometry (LPS spacing, origin, row-major direction)."""
        lps = np.eye(4)
        lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing, dtype=np.float64)
        lps[:3, 3] = origin
        return LPS_FLIP @ lps

    # -------------------------------------------------------------- reorienting
    def reoriented(self, codes: str = "LPS") -> "CTVolume":
        """The same volume with its axes permuted/flipped so that ``orientation == codes``.

        Only exact permutations and flips are applied (no interpolation), so HU
        values are unchanged. ``"LPS"`` gives the radiological layout: an axial
        slice ``array[:, :, k].T`` shows anterior at the top and the patient's
        right on the left of the screen.
        """
        current = nib.orientations.io_orientation(self.affine)
        target = nib.orientations.axcodes2ornt(tuple(codes))
        transform = nib.orientations.ornt_transform(current, target)
        if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
            return self
        array = nib.orientations.apply_orientation(self.array, transform)
        affine = self.affine @ nib.orientations.inv_ornt_aff(transform, self.array.shape)
        return replace(self, array=np.ascontiguousarray(array), affine=affine, notes=list(self.notes))

