"""Generated CT volumes against real ones: ``ctgridit evaluate``.

Measures, each computed the same way on both sets of volumes:

- ``hu_wasserstein``: the Wasserstein-1 distance (HU) between the voxel HU
  distributions (within the window), a million voxels sampled from each set;
- ``lung_profile_l1``: the mean absolute difference of the mean per-slice lung
  fraction profiles (:func:`~ctgridit.ct.along_z.lung_fraction`), each volume's
  profile resampled to 100 points from its first to its last slice;
- ``continuity``: the mean absolute HU difference of neighbouring slices, per
  set, and their ratio (generated over real; 1 is the real scans' own);
- ``far_ssim``: the largest SSIM between slices more than 45 mm apart, the
  mean over volumes, per set (repeated anatomy when high);
- ``nearest_ssim_median``, ``nearest_ssim_max``: how close the generated slices
  come to the real ones (a model that copies its training scans reaches 1):
  for every generated axial slice the SSIM of the nearest real axial slice of
  the same size (:func:`nearest_slice_ssim`), median and max over all slices;
  give the training scans as the real set to see how close a model stays to them;
- ``fid_axial``, ``fid_coronal``, ``fid_sagittal`` and their mean ``fid_25d``
  (2.5D FID, as MAISI reports it): the Frechet distance between feature
  statistics of slices of the three orientations. The feature network is the
  user's, a TorchScript file taking ``(N, 3, S, S)`` images in [0, 1] (the HU
  window, gray repeated to 3 channels) and returning ``(N, F)`` features
  (anything more is flattened); nothing is downloaded.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctgridit.ct.io import NIFTI_SUFFIXES, read_ct
from ctgridit.ct.along_z import lung_fraction, max_far_ssim, neighbour_difference
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.window import DEFAULT_WINDOW, to_unit
from ctgridit.errors import CTGridItError

#: Why a figure may not be a number (``ctgridit evaluate --report`` writes ``null`` with the reason).
REASONS = {"far_ssim_real": "none: the real volumes are all shorter than the far distance (45 mm)",
           "far_ssim_generated": "none: the generated volumes are all shorter than the far distance (45 mm)",
           "continuity_ratio": "none: the real volumes do not change from slice to slice"}
PROFILE_POINTS = 100
FAR_MM = 45.0
SAMPLED_VOXELS = 1_000_000
#: Slices per volume and orientation fed to the feature network, and their size.
FID_SLICES = 32
FID_SIZE = 128


def read_folder(folder: str | os.PathLike) -> list[CTVolume]:
    """Every NIfTI volume of ``folder`` (sorted by name)."""
    path = Path(folder)
    if not path.is_dir():
        raise CTGridItError("is not a folder of NIfTI volumes", path, "give the folder the volumes are in")
    files = sorted(p for p in path.iterdir() if p.name.lower().endswith(NIFTI_SUFFIXES))
    if not files:
        raise CTGridItError("holds no NIfTI volumes (.nii, .nii.gz)", path, "give the folder the volumes are in")
    return [read_ct(f) for f in files]


def evaluate(real: list[CTVolume], generated: list[CTVolume], features: str | os.PathLike | None = None,
             window=DEFAULT_WINDOW, seed: int = 0) -> dict:
    """The measures of the module docstring, as a dict of floats (FID only with a feature network)."""
    rng = np.random.default_rng(seed)
    out = {"real_volumes": len(real), "generated_volumes": len(generated)}
    out["hu_wasserstein"] = _hu_distance(real, generated, window, rng)
    profiles = [np.mean([_profile(v) for v in vols], axis=0) for vols in (real, generated)]
    out["lung_profile_l1"] = float(np.abs(profiles[0] - profiles[1]).mean())
    continuity = [float(np.mean([neighbour_difference(v.array) for v in vols])) for vols in (real, generated)]
    out.update(continuity_real=continuity[0], continuity_generated=continuity[1],
               continuity_ratio=continuity[1] / continuity[0] if continuity[0] > 0 else float("nan"))
    for name, vols in (("real", real), ("generated", generated)):
        far = [max_far_ssim(v.array, math.ceil(FAR_MM / v.spacing[2]), window) for v in vols]
        far = [f for f in far if np.isfinite(f)]
        out[f"far_ssim_{name}"] = float(np.mean(far)) if far else float("nan")
    sized = [v.array for v in real if v.shape[:2] == generated[0].shape[:2]]
    if sized:
        nearest = np.concatenate([nearest_slice_ssim(v.array, np.concatenate(sized, axis=2), window)
                                  for v in generated if v.shape[:2] == sized[0].shape[:2]])
        out.update(nearest_ssim_median=float(np.median(nearest)), nearest_ssim_max=float(nearest.max()))
    if features is not None:
        net = load_feature_network(features)
        for plane in ("axial", "coronal", "sagittal"):
            a, b = (_features(net, vols, plane, window, features) for vols in (real, generated))
            out[f"fid_{plane}"] = frechet_distance(a, b)
        out["fid_25d"] = float(np.mean([out[f"fid_{p}"] for p in ("axial", "coronal", "sagittal")]))
    return out


def nearest_slice_ssim(generated: np.ndarray, real: np.ndarray, window=DEFAULT_WINDOW,
                       candidates: int = 16) -> np.ndarray:
    """For every axial slice of ``generated`` ``(X, Y, Z)``: the largest SSIM with an axial slice of ``real``
    ``(X, Y, M)`` (same in-plane size, HU).

    SSIM as scikit-image computes it on the HU window scaled to [0, 1] (7 x 7
    window, data range 1), exactly, against the ``candidates`` real slices
    nearest in mean squared difference (SSIM against all of them would take
    minutes). A slice that copies a real one, or nearly, has it among those;
    for a slice like none of them the figure may come out a little low, which
    hides no copy.
    """
    from skimage.metrics import structural_similarity

    g = to_unit(np.asarray(generated, dtype=np.float64), window)
    r = to_unit(np.asarray(real, dtype=np.float64), window)
    gf, rf = g.reshape(-1, g.shape[2]).T, r.reshape(-1, r.shape[2]).T                   # (Z, P), (M, P)
    distance = (gf ** 2).sum(1)[:, None] + (rf ** 2).sum(1)[None] - 2 * gf @ rf.T
    nearest = np.argsort(distance, axis=1)[:, :candidates]
    return np.array([max(structural_similarity(g[:, :, z], r[:, :, m], data_range=1.0) for m in nearest[z])
                     for z in range(g.shape[2])])


def _hu_distance(real, generated, window, rng) -> float:
    from scipy.stats import wasserstein_distance

    def sample(vols):
        voxels = np.concatenate([np.clip(v.array.ravel(), *window) for v in vols])
        return rng.choice(voxels, size=min(SAMPLED_VOXELS, voxels.size), replace=False)

    return float(wasserstein_distance(sample(real), sample(generated)))


def _profile(volume: CTVolume) -> np.ndarray:
    fraction = lung_fraction(volume.reoriented("LPS").array)
    return np.interp(np.linspace(0, 1, PROFILE_POINTS), np.linspace(0, 1, len(fraction)), fraction)


def load_feature_network(path: str | os.PathLike) -> torch.nn.Module:
    """The user's TorchScript feature network, on the CPU, in eval mode."""
    try:
        with warnings.catch_warnings():                      # torch's notice about TorchScript's future, not the user's
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as err:  # not a TorchScript archive
        raise CTGridItError(f"not a TorchScript feature network ({type(err).__name__})", path,
                            "save one with torch.jit.save(torch.jit.script(net), path)") from err


def _slices(volume: CTVolume, plane: str, window) -> torch.Tensor:
    """Up to FID_SLICES evenly spaced slices of one orientation, ``(n, 3, FID_SIZE, FID_SIZE)`` in [0, 1]."""
    a = volume.reoriented("LPS").array
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
    picks = np.unique(np.linspace(0, a.shape[axis] - 1, min(FID_SLICES, a.shape[axis])).round().astype(int))
    images = np.stack([np.take(a, k, axis=axis) for k in picks])                   # (n, h, w)
    x = torch.from_numpy(to_unit(images, window).astype(np.float32))[:, None]
    x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x.expand(-1, 3, -1, -1)


@torch.no_grad()
def _features(net, volumes: list[CTVolume], plane: str, window, path=None) -> np.ndarray:
    """``(n, F)`` finite features of the slices of every volume; a network that gives anything else is refused."""
    chunks = []
    for v in volumes:
        images = _slices(v, plane, window)
        try:
            out = net(images)
        except Exception as err:  # the user's TorchScript: any error of its own
            raise CTGridItError(f"the feature network fails on {FID_SIZE} x {FID_SIZE} slices ({type(err).__name__})",
                                path, "give a network taking (N, 3, S, S) images in [0, 1]") from err
        if not torch.is_tensor(out) or out.ndim < 2 or out.shape[0] != len(images):
            raise CTGridItError(f"the feature network returns {tuple(getattr(out, 'shape', ()))} for a batch of slices, "
                                "not one feature vector per slice", path, "return (N, F) features")
        out = out.flatten(1).double()
        if not torch.isfinite(out).all():
            raise CTGridItError("the feature network returns NaN or infinite features", path,
                                "check the network on images in [0, 1]")
        chunks.append(out)
    return torch.cat(chunks).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets ``(n, F)`` (FID's formula)."""
    from scipy import linalg

    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():                          # sqrtm's accuracy notes: handled below
        warnings.simplefilter("ignore")
        try:
            root = linalg.sqrtm(s1 @ s2)
            if not np.isfinite(root).all():                  # near-singular: FID's usual regularisation
                eye = np.eye(len(s1)) * 1e-6
                root = linalg.sqrtm((s1 + eye) @ (s2 + eye))
        except (linalg.LinAlgError, ValueError) as err:
            raise CTGridItError(f"the Frechet distance cannot be computed from these features ({err})",
                                hint="check the feature network: its features must vary between slices") from err
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(root)))
