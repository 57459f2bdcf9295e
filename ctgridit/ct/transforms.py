"""MONAI transforms of the CT adapter: HU volumes in, windowed LPS volumes and grids out.

Data convention
---------------
A volume is a MONAI :class:`~monai.data.MetaTensor`, channel first
``(1, X, Y, Z)``, float32, whose ``.affine`` is the :class:`CTVolume`'s RAS
affine (voxel index -> world mm, RAS+; MONAI's and nibabel's convention, with
``meta["space"] == "RAS"``). :func:`volume_to_metatensor` and
:func:`metatensor_to_volume` convert between the two.

Canonical layout: LPS. After :class:`Orient`, voxel index ``i`` grows towards
the patient's Left, ``j`` towards Posterior and ``k`` towards Superior, so the
axial frame ``vol[0, :, :, k].T`` (rows = ``j``, columns = ``i``) shows
anterior at the top and the patient's right on the left of the screen (the
radiological view), and frame 0 is the most inferior slice.

Style (as MONAI's own): every transform ``X`` holds the logic (the maths lives
in plain functions) and its dictionary version ``Xd`` owns an ``X`` and applies
it to each key. The invertible ones record what they did on the MetaTensor
(``push_transform(extra_info=...)``) and their ``inverse`` works from that
record alone, so ``Compose([...]).inverse(data)`` undoes a whole pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import (
    InvertibleTransform,
    MapTransform,
    Orientation,
    Orientationd,
    ResizeWithPadOrCrop,
    ResizeWithPadOrCropd,
    Spacing,
    Spacingd,
    Transform,
)
from monai.utils import (
    SpaceKeys,
    TraceKeys,
    TransformBackends,
    convert_to_dst_type,
    convert_to_numpy,
    convert_to_tensor,
    ensure_tuple_rep,
)

from ctgridit.core.grid import GridLayout, GridSpec, grids_to_sequence, gray_to_rgb, rgb_to_gray, sequence_to_grids
from ctgridit.ct.io import read_ct
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.window import DEFAULT_WINDOW, MODEL_RANGE, unwindow_hu, window_hu

#: HU of air: the value that pads a CT volume.
HU_AIR = -1000.0
#: The canonical voxel layout (see the module docstring).
CANONICAL_AXCODES = "LPS"
#: Axis labels of a RAS affine, in nibabel's sense (+x = Right, +y = Anterior, +z = Superior).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: CT-RATE's voxel spacing (mm) along (X, Y, Z) and in-plane size (voxels).
#: Data-dictionary keys of the per-volume metadata used by the dictionary transforms.
SLOPE_KEY, INTERCEPT_KEY, SPACING_KEY = "slope", "intercept", "spacing"

__all__ = [
    "CANONICAL_AXCODES", "HU_AIR", "MODEL_RANGE",
    "volume_to_metatensor", "metatensor_to_volume", "affine_with_spacing", "window_hu", "unwindow_hu",
    "volume_to_frames", "frames_to_volume",
    "LoadCT", "LoadCTd", "SetSpacing", "SetSpacingd", "RescaleToHU", "RescaleToHUd", "HUWindow", "HUWindowd",
    "Orient", "Orientd", "ResampleToSpacing", "ResampleToSpacingd", "crop_or_pad_in_plane", "crop_or_pad_in_plane_d",
    "VolumeToGrids", "VolumeToGridsd",
]


# ------------------------------------------------------------------ conversion
def volume_to_metatensor(vol: CTVolume) -> MetaTensor:
    """A :class:`CTVolume` ``(X, Y, Z)`` as a float32 ``(1, X, Y, Z)`` MetaTensor with its RAS affine."""
    array = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[None]  # (1, X, Y, Z)
    meta = {"space": SpaceKeys.RAS.value}
    if vol.source:
        meta["filename_or_obj"] = vol.source
    return MetaTensor(array, affine=torch.as_tensor(vol.affine, dtype=torch.float64), meta=meta)


def metatensor_to_volume(t: torch.Tensor, like: CTVolume | None = None) -> CTVolume:
    """A ``(1, X, Y, Z)`` tensor as a float32 :class:`CTVolume`.

    The geometry is ``t.affine`` when ``t`` is a MetaTensor, else ``like.affine``;
    the other fields (source, source dtype, series UID, notes) come from ``like``.
    """
    if t.ndim != 4 or t.shape[0] != 1:
        raise ValueError(f"expected a (1, X, Y, Z) volume, got shape {tuple(t.shape)}")
    if isinstance(t, MetaTensor):
        affine = convert_to_numpy(t.affine, dtype=np.float64)
    elif like is not None:
        affine = like.affine
    else:
        raise ValueError("a plain tensor has no affine: pass a MetaTensor or `like`")
    array = np.ascontiguousarray(convert_to_numpy(t[0], dtype=np.float32))  # (X, Y, Z)
    if like is None:
        return CTVolume(array, affine)
    return replace(like, array=array, affine=affine, notes=list(like.notes))


def _plain(img: torch.Tensor) -> torch.Tensor:
    """The data of ``img`` without MONAI metadata (torch ops on it skip the meta tracking)."""
    return img.as_tensor() if isinstance(img, MetaTensor) else img


# --------------------------------------------------------------------- maths
def affine_with_spacing(affine: torch.Tensor | np.ndarray, spacing: Sequence[float]) -> torch.Tensor:
    """The 4x4 affine with the same axis directions and origin but voxel size ``spacing`` (mm)."""
    out = torch.as_tensor(affine, dtype=torch.float64).clone()
    norms = out[:3, :3].norm(dim=0)
    if not bool((norms > 0).all()):
        raise ValueError(f"affine has a zero-length axis: {out.tolist()}")
    out[:3, :3] = out[:3, :3] / norms * torch.as_tensor(spacing, dtype=torch.float64)
    return out


def volume_to_frames(volume: torch.Tensor) -> torch.Tensor:
    """``(1, X, Y, Z)`` LPS volume -> ``(Z, 1, Y, X)`` axial frames, frame ``k`` = ``volume[0, :, :, k].T``."""
    return volume.permute(3, 0, 2, 1)


def frames_to_volume(frames: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`volume_to_frames`: ``(Z, 1, Y, X)`` -> ``(1, X, Y, Z)``."""
    return frames.permute(1, 3, 2, 0).contiguous()


# ------------------------------------------------------- dictionary wrappers
class _MapArray(MapTransform):
    """Dictionary version of an array transform: applies ``self.transform`` to each key."""

    def __init__(self, keys: KeysCollection, transform: Transform, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = transform
        self.backend = transform.backend

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class _InvertibleMapArray(_MapArray, InvertibleTransform):
    """:class:`_MapArray` of an invertible transform; the inverse reads each key's own record."""

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform.inverse(d[key])
        return d


# ------------------------------------------------------------------- loading
class LoadCT(Transform):
    """Read a CT file with :func:`ctgridit.ct.io.read_ct` into a ``(1, X, Y, Z)`` HU MetaTensor."""

    backend = [TransformBackends.TORCH]

    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        return volume_to_metatensor(read_ct(path))


class LoadCTd(_MapArray):
    """Dictionary version of :class:`LoadCT`: replaces each key's path by its volume."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, LoadCT(), allow_missing_keys)


class SetSpacing(Transform):
    """Replace the voxel spacing of a volume's affine, keeping axis directions and origin.

    For files whose header spacing is wrong (CT-RATE): ``spacing`` is along the
    stored array axes ``(X, Y, Z)``. It corrects metadata, so it is not
    invertible (the inverse would restore a wrong header).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, spacing: Sequence[float] | None = None) -> None:
        self.spacing = spacing

    def __call__(self, img: torch.Tensor, spacing: Sequence[float] | None = None) -> MetaTensor:
        spacing = self.spacing if spacing is None else spacing
        if spacing is None:
            raise ValueError("SetSpacing needs a spacing")
        img = convert_to_tensor(img, track_meta=True)
        out = convert_to_dst_type(_plain(img), dst=img)[0]  # shares the voxels, own metadata
        out.affine = affine_with_spacing(img.affine, spacing)
        return out


class SetSpacingd(MapTransform):
    """Dictionary version of :class:`SetSpacing`: the spacing of each item is ``data[spacing_key]``."""

    backend = SetSpacing.backend

    def __init__(self, keys: KeysCollection, spacing_key: str = SPACING_KEY, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spacing_key = spacing_key
        self.setter = SetSpacing()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.setter(d[key], spacing=d[self.spacing_key])
        return d


# ----------------------------------------------------------------- intensity
class RescaleToHU(Transform):
    """Stored values to HU: ``HU = slope * raw + intercept`` (DICOM/CT-RATE rescale).

    Deliberately not invertible: HU are the meaningful unit, so the inverse of a
    pipeline (``Compose.inverse``) stops at HU instead of going back to the
    file's storage values.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, slope: float = 1.0, intercept: float = 0.0) -> None:
        self.slope = slope
        self.intercept = intercept

    def __call__(self, img: torch.Tensor, slope: float | None = None, intercept: float | None = None) -> torch.Tensor:
        slope = self.slope if slope is None else slope
        intercept = self.intercept if intercept is None else intercept
        img = convert_to_tensor(img, track_meta=get_track_meta(), dtype=torch.float32)
        return img * float(slope) + float(intercept)


class RescaleToHUd(MapTransform):
    """Dictionary version of :class:`RescaleToHU`: slope and intercept of each item come from the data."""

    backend = RescaleToHU.backend

    def __init__(self, keys: KeysCollection, slope_key: str = SLOPE_KEY, intercept_key: str = INTERCEPT_KEY,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slope_key, self.intercept_key = slope_key, intercept_key
        self.rescaler = RescaleToHU()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.rescaler(d[key], slope=d[self.slope_key], intercept=d[self.intercept_key])
        return d


class HUWindow(InvertibleTransform):
    """Clip HU to ``window`` and scale linearly to ``output_range`` (default -1000..1000 HU -> [-1, 1]).

    The inverse maps back to HU. Clipping loses information: a voxel that was
    outside the window comes back at the window edge, so the round trip is the
    identity only on voxels inside the window. The inverse first clamps its
    input to ``output_range`` (a generated value beyond it stays in the window).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, window: Sequence[float] = DEFAULT_WINDOW, output_range: Sequence[float] = MODEL_RANGE) -> None:
        if not window[0] < window[1] or not output_range[0] < output_range[1]:
            raise ValueError(f"window {window} and output range {output_range} must be increasing pairs")
        self.window = tuple(float(v) for v in window)
        self.output_range = tuple(float(v) for v in output_range)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=get_track_meta(), dtype=torch.float32)
        out = convert_to_dst_type(window_hu(_plain(img), self.window, self.output_range), dst=img)[0]
        return self.push_transform(out, extra_info={"window": list(self.window),
                                                    "output_range": list(self.output_range)})

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        info = self.pop_transform(data)[TraceKeys.EXTRA_INFO]
        hu = unwindow_hu(_plain(data), info["window"], info["output_range"])
        return convert_to_dst_type(hu, dst=data)[0]


class HUWindowd(_InvertibleMapArray):
    """Dictionary version of :class:`HUWindow`."""

    def __init__(self, keys: KeysCollection, window: Sequence[float] = DEFAULT_WINDOW,
                 output_range: Sequence[float] = MODEL_RANGE, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, HUWindow(window, output_range), allow_missing_keys)


# ------------------------------------------------------------------ geometry
class Orient(Orientation):
    """MONAI's invertible :class:`~monai.transforms.Orientation` to ``axcodes`` (default LPS).

    Only permutes and flips axes (exact, no interpolation) and updates the
    affine. The labels are fixed to RAS because the affine is RAS (module docstring).
    """

    def __init__(self, axcodes: str = CANONICAL_AXCODES) -> None:
        super().__init__(axcodes=axcodes, labels=RAS_LABELS)


class Orientd(Orientationd):
    """Dictionary version of :class:`Orient`."""

    def __init__(self, keys: KeysCollection, axcodes: str = CANONICAL_AXCODES,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, axcodes=axcodes, labels=RAS_LABELS, allow_missing_keys=allow_missing_keys)


class ResampleToSpacing(Spacing):
    """MONAI's invertible :class:`~monai.transforms.Spacing` with ctgridit's defaults.

    Resamples to ``spacing`` mm (``(x, y, z)`` along the volume's axes; CT-RATE's is 0.75 x 0.75 x 1.5) keeping
    the axis directions; ``mode="bilinear"`` is trilinear on a 3D volume. The
    output covers the input's voxel-centre extent (MONAI's convention: ``n``
    voxels at ``s`` mm become ``round((n - 1) * s / t) + 1`` at ``t`` mm, the
    first voxel centre staying in place). The inverse resamples back onto the original shape and affine,
    so values come back interpolated twice, not bit for bit. Resampling runs
    in ``dtype`` (float32 by default, to keep full-size CT in memory).
    """

    def __init__(self, spacing: Sequence[float], mode: str = "bilinear",
                 padding_mode: str = "border", dtype: type = np.float32) -> None:
        super().__init__(pixdim=spacing, mode=mode, padding_mode=padding_mode, dtype=dtype)


class ResampleToSpacingd(Spacingd):
    """Dictionary version of :class:`ResampleToSpacing`."""

    def __init__(self, keys: KeysCollection, spacing: Sequence[float], mode: str = "bilinear",
                 padding_mode: str = "border", dtype: type = np.float32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, pixdim=spacing, mode=mode, padding_mode=padding_mode, dtype=dtype,
                         allow_missing_keys=allow_missing_keys)


def crop_or_pad_in_plane(spatial_size: int | Sequence[int],
                         pad_value: float = HU_AIR) -> ResizeWithPadOrCrop:
    """MONAI's centre crop / pad of the in-plane axes ``(X, Y)`` of a ``(1, X, Y, Z)`` volume to
    ``spatial_size``, z untouched.

    Padding uses ``pad_value`` (air: -1000 HU by default; use -1 after
    :class:`HUWindow`); the affine follows, so every kept voxel stays at its world
    position. The inverse crops a padding off exactly and fills a cropped border
    with 0 (a correction computed on the cropped grid is none outside it).
    """
    x, y = ensure_tuple_rep(spatial_size, 2)
    return ResizeWithPadOrCrop((int(x), int(y), -1), mode="constant", value=float(pad_value))


def crop_or_pad_in_plane_d(keys: KeysCollection, spatial_size: int | Sequence[int],
                           pad_value: float = HU_AIR, allow_missing_keys: bool = False) -> ResizeWithPadOrCropd:
    """Dictionary version of :func:`crop_or_pad_in_plane`."""
    x, y = ensure_tuple_rep(spatial_size, 2)
    return ResizeWithPadOrCropd(keys, (int(x), int(y), -1), mode="constant", value=float(pad_value),
                                allow_missing_keys=allow_missing_keys)


# --------------------------------------------------------------------- grids
class VolumeToGrids(InvertibleTransform):
    """A ``(1, X, Y, Z)`` LPS volume (values in [-1, 1]) -> ``(G, 3, R*h, C*w)`` grids of axial frames.

    The frames ``(Z, 1, Y, X)`` come from :func:`volume_to_frames` (radiological
    view, frame 0 most inferior) and go through
    :func:`ctgridit.core.grid.sequence_to_grids` with ``spec`` (grid shape,
    z-stride, in-plane factor; the last grids are completed with ``pad_mode``:
    ``"edge"`` repeats the last slice, ``"constant"`` uses ``pad_value``, air by default),
    then to 3 channels when ``rgb`` (for an RGB codec; 1 channel otherwise).

    The output keeps the volume's metadata and records the :class:`GridLayout`,
    so the inverse rebuilds the ``(1, X, Y, Z)`` MetaTensor with its affine:
    exactly (bit for bit) when ``factor == 1``, with or without ``rgb``; up to
    the in-plane resize when ``factor > 1``.
    The depth padding is removed. Its affine does not describe grid pixels. To
    invert new grids (e.g. generated ones), give them this output's metadata:
    ``MetaTensor(new, meta=grids.meta, applied_operations=grids.applied_operations)``.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, spec: GridSpec = GridSpec(), rgb: bool = True, pad_mode: str = "edge",
                 pad_value: float = MODEL_RANGE[0]) -> None:
        self.spec = spec
        self.rgb = rgb
        self.pad_mode = pad_mode
        self.pad_value = pad_value

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=get_track_meta())
        if img.ndim != 4 or img.shape[0] != 1:
            raise ValueError(f"expected a (1, X, Y, Z) volume, got shape {tuple(img.shape)}")
        frames = volume_to_frames(_plain(img))                              # (Z, 1, Y, X)
        grids, layout = sequence_to_grids(frames, self.spec, self.pad_mode, self.pad_value)  # (G, 1, R*h, C*w)
        if self.rgb:
            grids = gray_to_rgb(grids)                                      # (G, 3, R*h, C*w)
        out = convert_to_dst_type(grids, dst=img)[0]
        return self.push_transform(out, orig_size=tuple(img.shape[1:]),
                                   extra_info={"layout": layout.to_dict(), "rgb": self.rgb})

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        info = self.pop_transform(data)[TraceKeys.EXTRA_INFO]
        grids = rgb_to_gray(_plain(data)) if info["rgb"] else _plain(data)  # (G, 1, R*h, C*w)
        frames = grids_to_sequence(grids, GridLayout.from_dict(info["layout"]))  # (Z, 1, Y, X)
        return convert_to_dst_type(frames_to_volume(frames), dst=data)[0]   # (1, X, Y, Z)


class VolumeToGridsd(_InvertibleMapArray):
    """Dictionary version of :class:`VolumeToGrids`."""

    def __init__(self, keys: KeysCollection, spec: GridSpec = GridSpec(), rgb: bool = True, pad_mode: str = "edge",
                 pad_value: float = MODEL_RANGE[0], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, VolumeToGrids(spec, rgb, pad_mode, pad_value), allow_missing_keys)
