"""The CT adapters (:class:`CTAdapter` for CT files and DICOM folders, :class:`CTRateAdapter` for CT-RATE) between
the generic core's frame sequences and CT volumes (:mod:`ctgridit.adapters`).

Training data: scans read in HU, oriented, resampled and windowed into frame
sequences (:mod:`ctgridit.ct.sequences`). Model folders record the HU window
and the voxel spacing of their training data. A generated sequence ``(N, C, H, W)`` in [-1, 1] becomes a :class:`CTVolume`:
channels averaged (:func:`~ctgridit.core.grid.rgb_to_gray`), mapped back to HU
through the model's window, and stacked as axial slices in the canonical LPS
layout of :mod:`ctgridit.ct.transforms` (frame 0 the most inferior slice, rows
anterior to posterior, columns patient right to left). The affine carries the
model's voxel spacing and puts the volume's centre at the world origin, so 3D
Slicer shows it upright with the right proportions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ctgridit.adapters import Adapter
from ctgridit.core.grid import rgb_to_gray
from ctgridit.ct.transforms import frames_to_volume, unwindow_hu
from ctgridit.ct.volume import LPS_FLIP, CTVolume
from ctgridit.ct.window import DEFAULT_WINDOW
from ctgridit.errors import CTGridItError


def centred_lps_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """The RAS affine of an LPS-ordered ``(X, Y, Z)`` array with ``spacing`` mm, centred on the world origin."""
    lps = np.diag([*map(float, spacing), 1.0])
    lps[:3, 3] = -lps[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2)
    return LPS_FLIP @ lps


def sequence_to_volume(frames: torch.Tensor, spacing: Sequence[float],
                       window: Sequence[float] = DEFAULT_WINDOW, source: str | None = None) -> CTVolume:
    """``(N, C, H, W)`` frames in [-1, 1] -> a float32 HU :class:`CTVolume` of shape ``(W, H, N)``."""
    gray = rgb_to_gray(frames.detach().float().cpu()) if frames.shape[1] > 1 else frames.detach().float().cpu()
    hu = unwindow_hu(frames_to_volume(gray), window)[0]                # (X, Y, Z)
    array = hu.numpy()
    return CTVolume(array, centred_lps_affine(array.shape, spacing), source=source, source_dtype="int16")


def volume_spacing(settings: dict[str, Any], folder: str | None = None) -> list[float]:
    """The voxel spacing (mm) a CT model folder records for its volumes (``settings.adapter.spacing``); a folder
    that records none is refused."""
    if "spacing" not in settings:
        raise CTGridItError("the model folder does not record its voxel spacing (settings.adapter.spacing in "
                            "model_index.json)", folder, "add it to the training config's adapter section and "
                            "export again")
    return list(settings["spacing"])


class CTAdapter(Adapter):
    """CT files (NIfTI, NRRD/MHA, DICOM folders and zips) as training data; CT volumes in HU as output."""

    name = "ct"
    title = "CT"
    trained_on = "CT volumes"

    def check_data(self, config) -> None:
        """The CT data settings: scans to read, an HU window, a spacing in mm."""
        data = config.data
        if not data.paths:
            raise CTGridItError("data.paths is empty: a ct config needs the CT files or folders to train on",
                                config.source)
        self._check_geometry(config)

    @staticmethod
    def _check_geometry(config) -> None:
        data = config.data
        if data.window is not None and (len(data.window) != 2 or not data.window[0] < data.window[1]):
            raise CTGridItError(f"data.window must be [low, high] HU with low < high, got {data.window}", config.source)
        if data.spacing is not None and (len(data.spacing) != 3 or min(data.spacing) <= 0):
            raise CTGridItError(f"data.spacing must be three positive sizes in mm, got {data.spacing}", config.source)

    @staticmethod
    def window(config) -> list[float]:
        """The HU window mapped to [-1, 1]: ``data.window``, or -1000..1000 (:data:`~ctgridit.ct.window.DEFAULT_WINDOW`)."""
        return list(config.data.window or DEFAULT_WINDOW)

    def training_sequences(self, config):
        """All scans in memory, prepared (:func:`~ctgridit.ct.sequences.load_ct_sequences`)."""
        from ctgridit.ct.sequences import load_ct_sequences

        data = config.data
        return load_ct_sequences(data.paths, spacing=data.spacing, window=self.window(config),
                                 in_plane=None if data.tile else tuple(config.frame_size), hold_out=data.hold_out)

    def prepare_sequences(self, config):
        """The scans as a lazy loader with ``name(i)`` and ``load(i)``, for ``ctgridit prepare``."""
        from ctgridit.ct.sequences import CTFileSequences

        data = config.data
        return CTFileSequences(data.paths, spacing=data.spacing, window=self.window(config),
                               in_plane=None if data.tile else tuple(config.frame_size), hold_out=data.hold_out)

    def model_settings(self, config) -> dict[str, Any]:
        """The HU window and, where the data were resampled, the voxel spacing (mm) of generated volumes."""
        settings: dict[str, Any] = {"kind": "ct", "window": self.window(config)}
        if config.data.spacing:
            settings["spacing"] = list(config.data.spacing)
        return settings

    def to_output(self, frames: torch.Tensor, settings: dict[str, Any], source: str | None = None) -> CTVolume:
        """A HU :class:`CTVolume` with the model's spacing (:func:`sequence_to_volume`)."""
        return sequence_to_volume(frames, volume_spacing(settings), settings.get("window", DEFAULT_WINDOW),
                                  source=source)


class CTRateAdapter(CTAdapter):
    """CT-RATE (a folder of volumes and its metadata CSV) as training data; its models write CT volumes."""

    name = "ctrate"

    def check_data(self, config) -> None:
        if not (config.data.ctrate_root and config.data.ctrate_csv):
            raise CTGridItError("data.ctrate_root and data.ctrate_csv are needed for CT-RATE", config.source)
        self._check_geometry(config)

    def training_sequences(self, config):
        """A lazy loader (:class:`~ctgridit.ct.sequences.CTRateSequences`): every volume read when a grid needs it,
        the depths from the headers, remembered beside the checkpoints."""
        return self._sequences(config, depth_cache=Path(config.checkpoint.dir) / "ctrate_depths.json")

    def prepare_sequences(self, config):
        return self._sequences(config)

    def _sequences(self, config, depth_cache: Path | None = None):
        from ctgridit.ct.sequences import CTRateSequences

        data = config.data
        return CTRateSequences(data.ctrate_root, data.ctrate_csv, window=self.window(config), in_plane=config.frame_size[0],
                               hold_out=data.hold_out, depth_cache=depth_cache,
                               **({"spacing": data.spacing} if data.spacing else {}))
