"""CT scans as the frame sequences of the training datasets (:mod:`ctgridit.training.datasets`).

A scan becomes a float32 sequence ``(N, 1, H, W)`` in ``[-1, 1]`` with the
transforms of :mod:`ctgridit.ct.transforms`: read in HU
(:func:`~ctgridit.ct.io.read_ct`), orient LPS (:class:`Orient`), optionally
resample to ``spacing`` mm (:class:`ResampleToSpacing`, trilinear) and centre
crop / pad in-plane to ``in_plane`` voxels with air (:func:`~ctgridit.ct.transforms.crop_or_pad_in_plane`),
clip to ``window`` and scale (:class:`HUWindow`). Frames are the axial slices in
the radiological view (:func:`volume_to_frames`): frame 0 the most inferior,
``H`` along Y (anterior at the top), ``W`` along X (patient's right on the
left).

- :func:`load_ct_sequences`: files and DICOM folders, all in memory;
- :class:`CTRateSequences`: a CT-RATE folder + metadata CSV as a lazy loader
  (each volume read when asked for; its length known from the header alone),
  for datasets too large for memory.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from monai.utils import ensure_tuple_rep

from ctgridit.ct.ctrate import CTRATE_IN_PLANE, CTRATE_SPACING, IMAGE_KEY, CTRateDataset, CTRateRecord, ctrate_preprocess
from ctgridit.ct.io import ITK_SUFFIXES, NIFTI_SUFFIXES, read_ct
from ctgridit.ct.transforms import (
    HU_AIR,
    HUWindow,
    Orient,
    ResampleToSpacing,
    affine_with_spacing,
    crop_or_pad_in_plane,
    volume_to_frames,
    volume_to_metatensor,
)
from ctgridit.ct.window import DEFAULT_WINDOW
from ctgridit.errors import CTGridItError

#: File suffixes of the volumes a folder is expanded into (any other folder is a DICOM series).
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES

#: A voxel spacing in mm: one value for all axes or ``(x, y, z)``.
SpacingMM = float | Sequence[float]


def ct_frames_transform(spacing: SpacingMM | None = None, window: Sequence[float] = DEFAULT_WINDOW,
                        in_plane: int | Sequence[int] | None = None) -> Compose:
    """HU ``(1, X, Y, Z)`` MetaTensor -> oriented, resampled, cropped/padded, windowed volume (module docstring).

    ``spacing`` (mm, one value or ``(x, y, z)`` along LPS) and ``in_plane``
    (voxels, one value or ``(X, Y)``) are skipped when ``None``.
    """
    steps = [Orient()]
    if spacing is not None:
        steps.append(ResampleToSpacing(ensure_tuple_rep(spacing, 3)))
    if in_plane is not None:
        steps.append(crop_or_pad_in_plane(in_plane, pad_value=HU_AIR))
    steps.append(HUWindow(window))
    return Compose(steps)


def plain_frames(volume: torch.Tensor) -> torch.Tensor:
    """A preprocessed ``(1, X, Y, Z)`` volume as contiguous float32 frames ``(Z, 1, Y, X)``, no metadata."""
    plain = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    return volume_to_frames(plain).float().contiguous()


def scan_paths(paths: Sequence[str | os.PathLike], hold_out: Collection[str | os.PathLike] = ()) -> list[Path]:
    """The scans of ``paths``, in order, without those whose name is in ``hold_out``.

    A file is a scan (NIfTI, NRRD, MetaImage or a DICOM ``.zip``). A folder
    that directly holds volume files (:data:`VOLUME_SUFFIXES`) stands for them,
    in sorted order; any other folder is one DICOM series. ``hold_out`` holds
    file or folder names (or paths, of which only the name counts).
    """
    held = {Path(h).name for h in hold_out}
    scans = []
    for path in map(Path, paths):
        if not path.exists():
            raise CTGridItError("no such file or folder", path, "check the path")
        volumes = sorted(p for p in path.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES)) \
            if path.is_dir() else []
        scans.extend(volumes or [path])
    kept = [p for p in scans if p.name not in held]
    if not kept:
        raise CTGridItError(f"no CT scan left out of {len(scans)} after the hold-out",
                            hint="give more scans or hold fewer out")
    return kept


class CTSequences(list):
    """A list of ``(N, 1, H, W)`` scan sequences that also knows each scan's own slice spacing (mm)."""

    def __init__(self, sequences: Sequence[torch.Tensor], slice_spacings: Sequence[float]) -> None:
        super().__init__(sequences)
        self.slice_spacings = [float(s) for s in slice_spacings]


def slice_spacing(volume) -> float:
    """The voxel size (mm) of a CT volume along its axis closest to the body's long (S-I) axis."""
    affine = np.asarray(volume.affine, dtype=np.float64)[:3, :3]
    axis = int(np.argmax(np.abs(affine[2]) / np.linalg.norm(affine, axis=0)))
    return float(np.linalg.norm(affine[:, axis]))


def load_ct_sequences(paths: Sequence[str | os.PathLike], spacing: SpacingMM | None = None,
                      window: Sequence[float] = DEFAULT_WINDOW, in_plane: int | Sequence[int] | None = None,
                      hold_out: Collection[str | os.PathLike] = ()) -> CTSequences:
    """Read CT scans as ``(N, 1, H, W)`` sequences in [-1, 1], all in memory (module docstring).

    The result is a list that also records each scan's own slice spacing
    (:class:`CTSequences`), which tells the strides the scan can serve.

    Args:
        paths: files and folders (see :func:`scan_paths`).
        spacing: target voxel spacing in mm, ``(x, y, z)`` or one value;
            ``None`` keeps each scan's own.
        window: the HU window mapped to [-1, 1].
        in_plane: centre crop / pad every slice to ``in_plane`` voxels
            (``(X, Y)`` or one value), padding with air; ``None`` keeps the
            size (then scans of different sizes cannot share a dataset).
        hold_out: names of scans to leave out (e.g. a validation set).
    """
    files = CTFileSequences(paths, spacing, window, in_plane, hold_out)
    frames, spacings = [], []
    for i in range(len(files)):
        sequence, own = files.load(i)
        frames.append(sequence)
        spacings.append(own)
    return CTSequences(frames, spacings)


class CTFileSequences:
    """CT files and DICOM folders as a lazy loader (the protocol of :mod:`ctgridit.training.datasets`): item ``i``
    is read and prepared like :func:`load_ct_sequences` does, when asked for (``ctgridit prepare`` caches them)."""

    def __init__(self, paths: Sequence[str | os.PathLike], spacing: SpacingMM | None = None,
                 window: Sequence[float] = DEFAULT_WINDOW, in_plane: int | Sequence[int] | None = None,
                 hold_out: Collection[str | os.PathLike] = ()) -> None:
        self.paths = scan_paths(paths, hold_out)
        self.transform = ct_frames_transform(spacing, window, in_plane)

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return self.paths[i].name

    def load(self, i: int) -> tuple[torch.Tensor, float]:
        """Scan ``i`` as ``(N, 1, H, W)`` frames, and its own slice spacing (mm)."""
        volume = read_ct(self.paths[i])
        return plain_frames(self.transform(volume_to_metatensor(volume))), slice_spacing(volume)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.load(i)[0]


def resampled_depth(record: CTRateRecord, spacing: Sequence[float]) -> int:
    """The number of slices of a CT-RATE volume after orientation and resampling, from its header only.

    Runs :class:`Orient` and :class:`ResampleToSpacing` lazily (MONAI computes
    the output shape without touching voxels) on a voxel-less stand-in with the
    header's shape and the CSV spacing, so it agrees with the real preprocessing.
    """
    header = nib.load(record.path)                                    # reads the header, not the voxels
    affine = affine_with_spacing(header.affine, record.spacing)
    ghost = MetaTensor(torch.zeros(()).expand(1, *header.shape[:3]), affine=affine)  # (1, X, Y, Z), no memory
    pending = ResampleToSpacing(spacing)(Orient()(ghost, lazy=True), lazy=True)
    return int(pending.peek_pending_shape()[-1])


class CTRateSequences:
    """A CT-RATE folder as a lazy loader of ``(N, 1, H, W)`` sequences (the protocol of :mod:`ctgridit.training.datasets`).

    Item ``i`` reads one volume through :class:`~ctgridit.ct.ctrate.CTRateDataset`
    with :func:`~ctgridit.ct.ctrate.ctrate_preprocess` (CSV rescale and
    spacing, LPS, ``spacing`` mm, ``window``, in-plane ``in_plane`` voxels
    padded with air). ``num_frames(i)`` comes from the NIfTI header
    (:func:`resampled_depth`), so a dataset over 50,000 volumes is built
    without reading them; with ``depth_cache`` (a JSON file) those header
    reads happen once, later runs take the depths from the file (a volume whose
    file size or time changed is read again). ``hold_out``: VolumeNames to leave
    out. The voxels are not cached here: every access reads and resamples the
    volume again (``ctgridit prepare`` caches them).
    """

    def __init__(self, root: str | os.PathLike, metadata_csv: str | os.PathLike,
                 spacing: Sequence[float] = CTRATE_SPACING, window: Sequence[float] = DEFAULT_WINDOW,
                 in_plane: int | Sequence[int] = CTRATE_IN_PLANE, hold_out: Collection[str] = (),
                 depth_cache: str | os.PathLike | None = None) -> None:
        self.depth_cache = Path(depth_cache) if depth_cache is not None else None
        self.spacing = tuple(float(s) for s in ensure_tuple_rep(spacing, 3))
        transform = ctrate_preprocess(keys=IMAGE_KEY, spacing=self.spacing, spatial_size=in_plane, window=window)
        self.dataset = CTRateDataset(root, metadata_csv, transform=transform)
        held = set(hold_out)
        self.indices = [i for i, r in enumerate(self.dataset.records) if r.name not in held]
        if not self.indices:
            raise CTGridItError(f"all {len(self.dataset.records)} CT-RATE volumes are held out", root)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return plain_frames(self.dataset[self.indices[i]][IMAGE_KEY])           # (N, 1, H, W)

    def load(self, i: int) -> tuple[torch.Tensor, float]:
        """Volume ``i`` as ``(N, 1, H, W)`` frames, and its own slice spacing (mm, from the CSV)."""
        return self[i], self.slice_spacings[i]

    def name(self, i: int) -> str:
        """The VolumeName of sequence ``i``."""
        return self.dataset.records[self.indices[i]].name

    def num_frames(self, i: int) -> int:
        return resampled_depth(self.dataset.records[self.indices[i]], self.spacing)

    def lengths(self) -> list[int]:
        """``num_frames`` of every volume, from ``depth_cache`` where it is current (and updated there)."""
        import json

        cached: dict = {}
        if self.depth_cache is not None and self.depth_cache.is_file():
            try:
                cached = json.loads(self.depth_cache.read_text())
            except ValueError:
                cached = {}
        out, changed = [], False
        for i in range(len(self)):
            record = self.dataset.records[self.indices[i]]
            stat = record.path.stat()
            key = f"{record.name}|{list(self.spacing)}"
            stamp = [stat.st_size, stat.st_mtime_ns, list(record.spacing)]
            entry = cached.get(key)
            if entry is None or entry[:3] != stamp:
                entry, changed = [*stamp, self.num_frames(i)], True
                cached[key] = entry
            out.append(int(entry[3]))
        if changed and self.depth_cache is not None:
            from ctgridit.files import atomic_output

            self.depth_cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(self.depth_cache, force=True) as tmp:
                tmp.write_text(json.dumps(cached))
        return out

    @property
    def slice_spacings(self) -> list[float]:
        """Each volume's own slice spacing (mm), from the metadata CSV (ZSpacing)."""
        return [float(self.dataset.records[i].spacing[2]) for i in self.indices]
