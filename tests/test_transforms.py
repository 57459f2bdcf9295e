"""Round trips and conventions of the CT MONAI transforms (ctgridit.ct.transforms)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from monai.transforms import Compose

from ctgridit.core.grid import GridSpec
from ctgridit.ct.ctrate import CTRATE_SPACING, ctrate_preprocess
from ctgridit.ct.io import read_ct
from ctgridit.ct.transforms import (
    HU_AIR,
    HUWindow,
    HUWindowd,
    LoadCTd,
    Orient,
    Orientd,
    RescaleToHUd,
    ResampleToSpacing,
    ResampleToSpacingd,
    SetSpacingd,
    VolumeToGrids,
    VolumeToGridsd,
    crop_or_pad_in_plane,
    crop_or_pad_in_plane_d,
    metatensor_to_volume,
    volume_to_metatensor,
    window_hu,
)
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.window import DEFAULT_WINDOW as HU_WINDOW

EXAMPLES = 40
GRID_SHAPES = [(1, 1), (2, 2), (4, 4), (2, 3)]
#: Axis code -> (RAS world axis, sign of the direction).
WORLD_AXIS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


# ------------------------------------------------------------------ helpers
@st.composite
def affines(draw) -> np.ndarray:
    """A random axis-aligned RAS affine: any permutation and flip of the axes, spacing, origin."""
    perm = draw(st.permutations([0, 1, 2]))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    spacing = draw(st.lists(st.sampled_from([0.5, 0.75, 1.0, 1.5, 3.0]), min_size=3, max_size=3))
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, world in enumerate(perm):
        affine[world, axis] = signs[axis] * spacing[axis]
    affine[:3, 3] = draw(st.lists(st.floats(-200, 200), min_size=3, max_size=3))
    return affine


@st.composite
def volumes(draw, min_size: int = 1, max_size: int = 9) -> MetaTensor:
    """A random ``(1, X, Y, Z)`` HU MetaTensor (values beyond the window included) with a random affine."""
    shape = draw(st.tuples(*[st.integers(min_size, max_size)] * 3))
    seed = draw(st.integers(0, 2**16))
    hu = torch.empty(shape).uniform_(-2000.0, 3000.0, generator=torch.Generator().manual_seed(seed))
    return volume_to_metatensor(CTVolume(hu.numpy(), draw(affines())))


def lps_volume(shape=(5, 4, 3), spacing=(1.0, 1.0, 1.0)) -> MetaTensor:
    """A random LPS volume of HU values inside the default window."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    return volume_to_metatensor(CTVolume(np.random.default_rng(0).uniform(-900, 900, shape), affine))


def clipped(t: torch.Tensor) -> torch.Tensor:
    return t.as_tensor().clamp(*HU_WINDOW)


def axcodes(t: MetaTensor) -> str:
    return "".join(nib.aff2axcodes(t.affine.numpy()))


def assert_same_geometry(a: MetaTensor, b: MetaTensor) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a.affine, b.affine, atol=1e-6)


# -------------------------------------------------------------- conversions
def test_volume_metatensor_round_trip(small_ct):
    vol = read_ct(small_ct)
    t = volume_to_metatensor(vol)
    assert t.shape == (1, *vol.shape) and t.dtype == torch.float32
    back = metatensor_to_volume(t, like=vol)
    assert np.array_equal(back.array, vol.array)
    assert np.array_equal(back.affine, vol.affine)
    assert back.source == vol.source
    assert np.array_equal(metatensor_to_volume(t.as_tensor(), like=vol).affine, vol.affine)


def test_metatensor_to_volume_needs_geometry():
    with pytest.raises(ValueError, match="affine"):
        metatensor_to_volume(torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="X, Y, Z"):
        metatensor_to_volume(MetaTensor(torch.zeros(2, 2, 2)))


def test_load_and_set_spacing(small_ct):
    d = Compose([LoadCTd("image"), SetSpacingd("image")])({"image": small_ct, "spacing": (1.0, 2.0, 4.0)})
    vol = read_ct(small_ct)
    assert torch.equal(d["image"][0], torch.from_numpy(vol.array))
    assert metatensor_to_volume(d["image"]).spacing == (1.0, 2.0, 4.0)
    assert np.allclose(d["image"].affine[:3, 3].numpy(), vol.affine[:3, 3])  # origin kept


def test_rescale_to_hu_reads_the_data_dict():
    raw = lps_volume()
    d = RescaleToHUd("image")({"image": raw, "slope": 2.0, "intercept": -1024.0})
    assert torch.equal(d["image"].as_tensor(), raw.as_tensor() * 2.0 - 1024.0)
    assert torch.equal(d["image"].affine, raw.affine)


# ---------------------------------------------------------------- intensity
@settings(max_examples=EXAMPLES, deadline=None)
@given(vol=volumes())
def test_hu_window_round_trip(vol):
    window = HUWindow()
    out = window(vol)
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert torch.allclose(window.inverse(out).as_tensor(), clipped(vol), rtol=0, atol=1e-3)
    windowd = HUWindowd(["a", "b"])
    d = windowd({"a": vol, "b": vol.clone()})
    back = windowd.inverse(d)
    for key in "ab":
        assert torch.equal(d[key].as_tensor(), out.as_tensor())
        assert torch.allclose(back[key].as_tensor(), clipped(vol), rtol=0, atol=1e-3)


def test_hu_window_values_and_custom_window():
    hu = MetaTensor(torch.tensor([[[[-3000.0, -1000.0, 0.0, 500.0, 1000.0, 4000.0]]]]))
    assert HUWindow()(hu).flatten().tolist() == [-1.0, -1.0, 0.0, 0.5, 1.0, 1.0]
    lung = HUWindow(window=(-1350.0, 150.0), output_range=(0.0, 1.0))
    assert lung(hu).flatten().tolist() == pytest.approx([0.0, 0.35 / 1.5, 0.9, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="increasing"):
        HUWindow(window=(100.0, -100.0))


def test_hu_window_on_real_scan(small_ct):
    vol = volume_to_metatensor(read_ct(small_ct))
    window = HUWindow()
    back = window.inverse(window(vol))
    inside = (vol >= HU_WINDOW[0]) & (vol <= HU_WINDOW[1])
    assert bool((~inside).any())  # the scan has voxels outside the window (air at -1024, ...)
    assert torch.allclose(back[inside], vol[inside], rtol=0, atol=1e-3)
    assert torch.equal(back[vol < HU_WINDOW[0]].unique(), torch.tensor([HU_WINDOW[0]]))


# ------------------------------------------------------------------ geometry
@settings(max_examples=EXAMPLES, deadline=None)
@given(vol=volumes())
def test_orient_round_trip(vol):
    orient = Orient()
    out = orient(vol)
    assert axcodes(out) == "LPS"
    assert sorted(out.shape) == sorted(vol.shape)
    back = orient.inverse(out)
    assert torch.equal(back.as_tensor(), vol.as_tensor())
    assert torch.allclose(back.affine, vol.affine)
    orientd = Orientd("image")
    d = orientd({"image": vol})
    assert torch.equal(d["image"].as_tensor(), out.as_tensor())
    assert torch.equal(orientd.inverse(d)["image"].as_tensor(), vol.as_tensor())


def world_index(vol: MetaTensor, x_sign: int, y_sign: int, z_rank: int) -> tuple[int, int, int]:
    """The voxel at the (x_sign * x, y_sign * y) extreme on the ``z_rank``-th axial level (world RAS mm)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape[1:]], indexing="ij"), axis=-1)  # (X, Y, Z, 3)
    world = grid @ vol.affine[:3, :3].numpy().T
    x, y, z = world[..., 0] * x_sign, world[..., 1] * y_sign, world[..., 2]
    level = np.unique(z.round(6))[z_rank]
    on_level = np.isclose(z, level)
    best = on_level & np.isclose(x, x[on_level].max()) & np.isclose(y, y[on_level].max())
    return tuple(int(i) for i in np.argwhere(best)[0])


@pytest.mark.parametrize("codes", ["RAS", "LPS", "ASL", "IRP"])
def test_frames_are_radiological(codes):
    """Right-anterior lands top-left of its frame, left-posterior bottom-right; frame 0 is inferior."""
    shape = (6, 5, 4)
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, code in enumerate(codes):
        world, sign = WORLD_AXIS[code]
        affine[world, axis] = sign
    vol = volume_to_metatensor(CTVolume(np.zeros(shape, dtype=np.float32), affine))
    assert axcodes(vol) == codes
    right_anterior = world_index(vol, +1, +1, z_rank=1)
    left_posterior = world_index(vol, -1, -1, z_rank=-1)
    vol[(0, *right_anterior)] = 0.5
    vol[(0, *left_posterior)] = -0.5
    lps = Orient()(vol)
    width, height, depth = lps.shape[1:]                           # frames are (Y, X) = (height, width)
    grids = VolumeToGrids(GridSpec(2, 2), rgb=False)(lps)          # frames 0..3 in cells (0,0) (0,1) (1,0) (1,1)
    frame = lambda k: grids[k // 4, 0, (k % 4 // 2) * height:(k % 4 // 2 + 1) * height,
                              (k % 2) * width:(k % 2 + 1) * width]
    assert frame(1)[0, 0] == 0.5                                   # anterior top, patient's right on the left
    assert frame(depth - 1)[height - 1, width - 1] == -0.5        # posterior bottom, patient's left on the right


@settings(max_examples=EXAMPLES, deadline=None)
@given(vol=volumes(min_size=2, max_size=7),
       spacing=st.tuples(*[st.sampled_from([0.5, 1.0, 1.5, 2.0])] * 3))
def test_resample_to_spacing_round_trip(vol, spacing):
    resample = ResampleToSpacing(spacing)
    out = resample(vol)
    assert np.allclose(metatensor_to_volume(out).spacing, spacing)
    assert axcodes(out) == axcodes(vol)
    assert np.allclose(out.affine[:3, 3], vol.affine[:3, 3])       # first voxel centre kept
    back = resample.inverse(out)
    assert_same_geometry(back, vol)
    resampled = ResampleToSpacingd("image", spacing)
    d = resampled({"image": vol})
    assert torch.allclose(d["image"].as_tensor(), out.as_tensor())
    assert_same_geometry(resampled.inverse(d)["image"], vol)


def test_resample_keeps_constant_and_identity():
    flat = lps_volume((6, 5, 4), spacing=(1.5, 1.5, 3.0)) * 0.0 + 40.0
    assert torch.allclose(ResampleToSpacing((0.75, 0.75, 1.5))(flat).as_tensor(), torch.tensor(40.0))
    vol = lps_volume(spacing=CTRATE_SPACING)
    assert torch.allclose(ResampleToSpacing(CTRATE_SPACING)(vol).as_tensor(), vol.as_tensor(), atol=1e-4)


@settings(max_examples=EXAMPLES, deadline=None)
@given(vol=volumes(), size=st.tuples(st.integers(1, 12), st.integers(1, 12)), pad=st.sampled_from([HU_AIR, -1.0]))
def test_crop_or_pad_round_trip(vol, size, pad):
    crop_pad = crop_or_pad_in_plane(size, pad_value=pad)
    out = crop_pad(vol)
    assert out.shape == (1, *size, vol.shape[-1])
    back = crop_pad.inverse(out)
    assert_same_geometry(back, vol)
    # every voxel that survives keeps its value and world position; the lost border comes back as 0
    keep = crop_pad.inverse(crop_pad(torch.ones_like(vol))).as_tensor() == 1
    assert torch.equal(back.as_tensor()[keep], vol.as_tensor()[keep])
    assert bool((back.as_tensor()[~keep] == 0).all())
    if all(n <= t for n, t in zip(vol.shape[1:3], size)):        # pad only: exact
        assert bool(keep.all())
    crop_padd = crop_or_pad_in_plane_d("image", size, pad_value=pad)
    d = crop_padd({"image": vol})
    assert torch.equal(d["image"].as_tensor(), out.as_tensor())
    assert torch.equal(crop_padd.inverse(d)["image"].as_tensor(), back.as_tensor())


def test_crop_or_pad_keeps_world_positions():
    vol = lps_volume((7, 4, 2))
    out = crop_or_pad_in_plane((4, 7), pad_value=HU_AIR)(vol)           # crop X by 3 (1 before), pad Y by 3 (1 before)
    assert torch.equal(out[0, :, 1:5], vol[0, 1:5, :])
    assert bool((out[0, :, [0, 5, 6]] == HU_AIR).all())
    assert torch.allclose(out.affine @ torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64),
                          vol.affine @ torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64))


# --------------------------------------------------------------------- grids
@settings(max_examples=EXAMPLES, deadline=None)
@given(vol=volumes(max_size=8), grid=st.sampled_from(GRID_SHAPES), stride=st.integers(1, 4), rgb=st.booleans())
def test_volume_to_grids_round_trip(vol, grid, stride, rgb):
    spec = GridSpec(*grid, stride=stride)
    x, y, z = vol.shape[1:]
    to_grids = VolumeToGrids(spec, rgb=rgb)
    grids = to_grids(vol)
    assert grids.shape[1:] == (3 if rgb else 1, grid[0] * y, grid[1] * x)
    back = to_grids.inverse(grids)
    assert_same_geometry(back, vol)
    if rgb:
        assert torch.equal(back.as_tensor(), vol.as_tensor())
    else:
        assert torch.equal(back.as_tensor(), vol.as_tensor())
    to_gridsd = VolumeToGridsd("image", spec, rgb=rgb)
    d = to_gridsd({"image": vol})
    assert torch.equal(d["image"].as_tensor(), grids.as_tensor())
    assert torch.equal(to_gridsd.inverse(d)["image"].as_tensor(), back.as_tensor())


@settings(max_examples=10, deadline=None)
@given(vol=volumes(min_size=4, max_size=9), factor=st.integers(2, 3))
def test_volume_to_grids_with_resize(vol, factor):
    to_grids = VolumeToGrids(GridSpec(2, 2, factor=factor))
    grids = to_grids(window_hu(vol))
    x, y = vol.shape[1:3]
    assert grids.shape[-2:] == (2 * -(-y // factor), 2 * -(-x // factor))
    assert_same_geometry(to_grids.inverse(grids), vol)


def test_generated_grids_invert_with_copied_meta():
    vol = window_hu(lps_volume((4, 3, 5)))
    to_grids = VolumeToGrids(rgb=True)
    grids = to_grids(vol)
    generated = MetaTensor(torch.zeros_like(grids.as_tensor()), meta=grids.meta,
                           applied_operations=grids.applied_operations)
    back = to_grids.inverse(generated)
    assert_same_geometry(back, vol)
    assert bool((back == 0).all())


def test_volume_to_grids_round_trip_on_real_scan(chest_ct):
    vol = HUWindow()(Orient()(volume_to_metatensor(read_ct(chest_ct))))
    for rgb in (False, True):
        to_grids = VolumeToGrids(GridSpec(2, 2), rgb=rgb)
        grids = to_grids(vol)
        assert grids.shape == (28, 3 if rgb else 1, 2 * 102, 2 * 122)
        back = to_grids.inverse(grids)
        assert_same_geometry(back, vol)
        assert torch.equal(back.as_tensor(), vol.as_tensor())


@settings(max_examples=10, deadline=None)
@given(vol=volumes(), size=st.integers(1, 10), grid=st.sampled_from(GRID_SHAPES), stride=st.integers(1, 3))
def test_dictionary_pipeline_inverse(vol, size, grid, stride):
    pipeline = Compose([Orientd("image"), HUWindowd("image"), crop_or_pad_in_plane_d("image", size, pad_value=-1.0),
                        VolumeToGridsd("image", GridSpec(*grid, stride=stride), rgb=False)])
    back = pipeline.inverse(pipeline({"image": vol}))["image"]
    assert_same_geometry(back, vol)
    keep = back != 0                                                # a cropped border comes back as 0
    assert torch.allclose(back[keep].as_tensor(), clipped(vol)[keep], rtol=0, atol=1e-3)


# ------------------------------------------------------------------- CT-RATE
def test_ctrate_preprocess_on_real_scans(chest_ct, small_ct):
    pre = ctrate_preprocess(spatial_size=256)
    chest = read_ct(chest_ct)                                       # LPS, 122 x 102 x 112 at 1.5 mm: pads
    d = pre({"image": volume_to_metatensor(chest), "slope": 1.0, "intercept": 0.0})
    image = d["image"]
    assert image.shape == (1, 256, 256, 112)
    assert np.allclose(metatensor_to_volume(image).spacing, CTRATE_SPACING)
    assert axcodes(image) == "LPS"
    assert image.min() >= -1.0 and image.max() <= 1.0
    for border in (image[0, 0], image[0, -1], image[0, :, 0], image[0, :, -1]):
        assert bool((border == -1.0).all())                         # air padding, windowed
    back = pre.inverse(d)["image"]                                  # HU on the original grid
    assert_same_geometry(back, volume_to_metatensor(chest))
    assert torch.allclose(back.as_tensor(), torch.from_numpy(chest.array).clamp(*HU_WINDOW)[None], atol=0.1)

    small = read_ct(small_ct)                                       # RAS, 122 x 101 x 30 at 3 mm: crops
    image = pre({"image": volume_to_metatensor(small), "slope": 1.0, "intercept": 0.0})["image"]
    assert image.shape == (1, 256, 256, 59) and axcodes(image) == "LPS"
    assert np.allclose(metatensor_to_volume(image).spacing, CTRATE_SPACING)
