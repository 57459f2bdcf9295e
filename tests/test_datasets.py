"""Training data of both stages on real CT and tiny videos (ctgridit/training/datasets.py, ctgridit/ct/sequences.py)."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ctgridit.core.conditioning import TaskMix
from ctgridit.core.degrade import Degrade
from ctgridit.core.grid import GridSpec, resize_frames, untile
from ctgridit.ct.ctrate import CSV_COLUMNS
from ctgridit.ct.io import read_ct
from ctgridit.ct.sequences import CTRateSequences, load_ct_sequences
from ctgridit.ct.transforms import window_hu
from ctgridit.errors import CTGridItError
from ctgridit.training.datasets import GridSampleDataset, InPlaneJitter, SRPairDataset, sample_seed
from ctgridit.video.adapter import VideoSequences
from ctgridit.video import frames_to_sequence, write_frames, write_video
from tests.conftest import data_file

SMALL, CHEST, DICOM = "totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/chest_crop.nii.gz", \
    "totalsegmentator/example_ct_dicom"
COARSE = 3.0  # mm: keeps the chest crop small (61 x 51 x 56 voxels)
IN_PLANE = (64, 48)  # (X, Y) voxels: pads X, crops Y of the chest crop at COARSE


@pytest.fixture(scope="module")
def ct_sequences() -> list[torch.Tensor]:
    """The small slab and the chest crop at COARSE mm, cropped / padded to IN_PLANE: (N, 1, 48, 64) each."""
    return load_ct_sequences([data_file(SMALL), data_file(CHEST)], spacing=COARSE, in_plane=IN_PLANE)


def cells_of(item: dict, spec: GridSpec) -> torch.Tensor:
    """The ``(R*C, channels, h, w)`` cells of a grid item."""
    return untile(item["x"], spec.rows, spec.cols)


def expected_cells(sequence: torch.Tensor, item_id: tuple[int, int, int], spec: GridSpec) -> torch.Tensor:
    """The frames ``k, k+s, ...`` an id names, resized like the grid cells, as 3 channels."""
    _, start, stride = item_id
    frames = sequence[start: start + (spec.cells - 1) * stride + 1: stride]
    return resize_frames(frames, spec.frame_size(*frames.shape[-2:])).expand(-1, 3, -1, -1)


# ------------------------------------------------------------------ CT sequences
def test_ct_sequences_native_geometry_and_radiological_view():
    path = data_file(SMALL)                                         # 122 x 101 x 30 at 3 mm, RAS
    (seq,) = load_ct_sequences([path])
    assert seq.shape == (30, 1, 101, 122) and seq.dtype == torch.float32
    hu = torch.from_numpy(read_ct(path).array)                       # (X, Y, Z) RAS
    lps = hu.flip(0, 1)                                              # R->L, A->P
    assert torch.allclose(seq[7, 0], window_hu(lps[:, :, 7].T), atol=1e-6)


def test_ct_sequences_spacing_window_and_padding(ct_sequences):
    small, chest = ct_sequences
    assert small.shape == (30, 1, 48, 64)                           # already at 3 mm along z
    assert chest.shape[1:] == (1, 48, 64)
    assert abs(chest.shape[0] - ((112 - 1) * 1.5 / COARSE + 1)) <= 1  # extent / spacing, +-1
    for seq in ct_sequences:
        assert seq.min() >= -1 and seq.max() <= 1 and seq.std() > 0.1
        assert seq.is_contiguous()
    assert (chest[..., :1] == -1).all() and (chest[..., -1:] == -1).all()  # 61 -> 64 columns padded with air


def test_ct_sequences_from_dicom_folders_and_volume_folders(tmp_path):
    (dicom,) = load_ct_sequences([data_file(DICOM)], spacing=8.0)    # 512 x 512 x 20 at 0.98 x 0.98 x 2 mm
    spacing = read_ct(data_file(DICOM)).spacing
    assert dicom.shape[1] == 1 and abs(dicom.shape[0] - (19 * spacing[2] / 8 + 1)) <= 1
    assert all(abs(n - (511 * s / 8 + 1)) <= 1 for n, s in zip(dicom.shape[2:], spacing[:2]))
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (folder / name).symlink_to(data_file(SMALL))
    (folder / "notes.txt").write_text("not a scan")
    assert len(load_ct_sequences([folder])) == 2
    held = load_ct_sequences([folder], hold_out=["a.nii.gz"])
    assert len(held) == 1
    with pytest.raises(CTGridItError, match="no CT scan left"):
        load_ct_sequences([folder], hold_out=["a.nii.gz", folder / "b.nii.gz"])
    with pytest.raises(CTGridItError, match="no such file"):
        load_ct_sequences([tmp_path / "missing.nii.gz"])


def test_ctrate_sequences_lazy_with_header_lengths(tmp_path):
    vol = read_ct(data_file(SMALL))                                  # 3 mm, RAS
    raw = np.rint((vol.array[30:90, 20:80, 5:25] + 1024) / 0.5).astype(np.int16)  # slope 0.5, intercept -1024
    rows = []
    for name in ("train_1_a_1.nii.gz", "train_2_a_1.nii.gz"):
        path = tmp_path / "data" / name
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(raw, np.diag([-1.0, -1.0, 1.0, 1.0])), str(path))  # wrong 1 mm header spacing
        rows.append({"VolumeName": name, "RescaleSlope": 0.5, "RescaleIntercept": -1024,
                     "XYSpacing": "[3.0, 3.0]", "ZSpacing": 3.0})
    with (tmp_path / "meta.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    sequences = CTRateSequences(tmp_path / "data", tmp_path / "meta.csv", spacing=(3.0, 3.0, 2.0), in_plane=64,
                                hold_out=["train_2_a_1.nii.gz"])
    assert len(sequences) == 1 and sequences.name(0) == "train_1_a_1.nii.gz"
    seq = sequences[0]
    assert seq.shape[1:] == (1, 64, 64) and seq.min() >= -1 and seq.max() <= 1
    assert sequences.num_frames(0) == seq.shape[0]                   # from the header alone
    assert abs(seq.shape[0] - (19 * 3 / 2 + 1)) <= 1                 # 20 slices at 3 mm -> 2 mm
    item = GridSampleDataset(sequences, GridSpec(2, 2))[0]
    assert item["x"].shape == (3, 128, 128)


# ------------------------------------------------------------------ stage-1 grids
def test_grid_items_hold_the_slices_their_id_names(ct_sequences):
    spec = GridSpec(2, 2)
    dataset = GridSampleDataset(ct_sequences, spec, stride_range=(1, 3), seed=1)
    strides = set()
    for index in range(40):
        item = dataset[index]
        sequence, start, stride = item["id"]
        assert item["index"] == index and item["x"].shape == (3, 96, 128) and item["x"].dtype == torch.float32
        assert 1 <= stride <= 3 and start + 3 * stride < ct_sequences[sequence].shape[0]
        assert torch.equal(cells_of(item, spec), expected_cells(ct_sequences[sequence], item["id"], spec))
        strides.add(stride)
    assert strides == {1, 2, 3}
    assert len(dataset) == 10**9


def test_interpolation_grids_of_several_gaps_hold_the_frames_at_their_positions():
    """With gaps, an interpolation grid's cells are frames 0, o1, o2 and g of a gap of g frames (g among the
    gaps, 0 < o1 <= o2 < g), and the item says where: every gap is drawn, other tasks stay consecutive."""
    frames = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 1, 4, 4) / 40
    data = GridSampleDataset([frames.contiguous()], GridSpec(rows=2, cols=2), channels=1,
                             tasks=TaskMix(0.0, 0.3, 0.7), gaps=[2, 3, 4, 5])
    seen = set()
    for index in range(200):
        item = data[index]
        cells = untile(item["x"][None], 2, 2)[0, :, 0, 0, 0] * 40             # the frame numbers
        offsets = (cells - cells[0]).round()
        torch.testing.assert_close(offsets, item["positions"])
        if item["known"].tolist() == [1, 0, 0, 1]:
            gap = int(offsets[-1])
            seen.add(gap)
            assert 2 <= gap <= 5 and 0 < offsets[1] <= offsets[2] < gap
        else:
            assert offsets.tolist() == [0, 1, 2, 3]
    assert seen == {2, 3, 4, 5}
    with pytest.raises(ValueError, match="gaps"):
        GridSampleDataset([frames.contiguous()], GridSpec(rows=2, cols=2), channels=1, gaps=[2, 3])


def test_tiles_are_cut_from_the_slices_and_short_sides_are_padded_with_air(ct_sequences):
    """crop=32 cuts one 32 x 32 tile at the same place out of the four slices; crop=56 is taller than the
    48-row slices, which are first padded with 4 rows of air (-1) above and below."""
    spec = GridSpec(2, 2)
    for crop in (32, 56):
        dataset = GridSampleDataset(ct_sequences, spec, seed=2, channels=1, crop=crop)
        for index in range(6):
            item = dataset[index]
            sequence, start, stride = item["id"]
            cells = cells_of(item, spec)                                   # (4, 1, crop, crop)
            assert cells.shape == (4, 1, crop, crop)
            frames = ct_sequences[sequence][start:start + 4 * stride:stride]      # (4, 1, 48, 64)
            if crop == 56:
                assert (cells[..., :4, :] == -1).all() and (cells[..., -4:, :] == -1).all()
                frames = torch.nn.functional.pad(frames, (0, 0, 4, 4), value=-1.0)
            found = [(y, x) for y in range(frames.shape[-2] - crop + 1) for x in range(frames.shape[-1] - crop + 1)
                     if torch.equal(frames[..., y:y + crop, x:x + crop], cells)]
            assert found, "the tile is not a window of the slices"


def test_grid_items_are_a_pure_function_of_seed_and_index(ct_sequences):
    spec = GridSpec(2, 2)
    a = GridSampleDataset(ct_sequences, spec, stride_range=(1, 4), seed=5)
    b = GridSampleDataset(ct_sequences, spec, stride_range=(1, 4), seed=5)
    other_seed = GridSampleDataset(ct_sequences, spec, stride_range=(1, 4), seed=6)
    later = [a[i] for i in (9, 3, 0)]                                # any order, no hidden state
    for item, index in zip(later, (9, 3, 0)):
        assert item["id"] == b[index]["id"] and torch.equal(item["x"], b[index]["x"])
    ids = [a[i]["id"] for i in range(30)]
    assert len(set(ids)) >= 25                                       # different indices, (almost) always different
    assert [other_seed[i]["id"] for i in range(30)] != ids
    assert sample_seed(5, 0) != sample_seed(5, 1) != sample_seed(6, 1)
    with pytest.raises(IndexError):
        a[len(a)]


def test_grid_items_split_across_processes_by_index(ct_sequences):
    dataset = GridSampleDataset(ct_sequences, GridSpec(2, 2), stride_range=(1, 2), length=8)
    batch = next(iter(DataLoader(dataset, batch_size=8)))
    world = 2
    for rank in range(world):                                        # each rank builds its own dataset
        mine = GridSampleDataset(ct_sequences, GridSpec(2, 2), stride_range=(1, 2), length=8)
        for index in range(rank, 8, world):
            assert torch.equal(mine[index]["x"], batch["x"][index])
            assert mine[index]["id"] == tuple(int(part[index]) for part in batch["id"])


@pytest.mark.parametrize("rows, cols", [(4, 4), (2, 3)])
def test_other_grid_shapes(ct_sequences, rows, cols):
    spec = GridSpec(rows, cols)
    dataset = GridSampleDataset(ct_sequences, spec, stride_range=(1, 2), channels=1)
    for index in range(5):
        item = dataset[index]
        assert item["x"].shape == (1, 48 * rows, 64 * cols)
        sequence = ct_sequences[item["id"][0]]
        assert torch.equal(cells_of(item, spec), expected_cells(sequence, item["id"], spec)[:, :1])


def test_factor_two_halves_the_frames(ct_sequences):
    spec = GridSpec(2, 2, factor=2)
    item = GridSampleDataset(ct_sequences, spec)[0]
    assert item["x"].shape == (3, 48, 64)
    assert torch.equal(cells_of(item, spec), expected_cells(ct_sequences[item["id"][0]], item["id"], spec))


def test_short_sequences_are_skipped_or_refused(ct_sequences):
    short = ct_sequences[0][:3]
    mixed = GridSampleDataset([short, ct_sequences[1]], GridSpec(2, 2), stride_range=(1, 30))
    for index in range(20):
        sequence, start, stride = mixed[index]["id"]
        assert sequence == 1 and start + 3 * stride < ct_sequences[1].shape[0]   # strides cut to fit
    with pytest.raises(ValueError, match="no sequence is long enough.*needs 4 frames, the longest has 3"):
        GridSampleDataset([short], GridSpec(2, 2))
    with pytest.raises(ValueError, match="stride_range"):
        GridSampleDataset(ct_sequences, GridSpec(2, 2), stride_range=(3, 2))


def test_explicit_strides_and_masked_tasks_and_stride_labels(ct_sequences):
    """Strides drawn from a list; the known cells of each item follow the task mix; labels are dropped at
    the given rate; the grid an index gives does not change when tasks or labels are switched on."""
    spec = GridSpec(2, 2)
    plain = GridSampleDataset(ct_sequences, spec, strides=(1, 3), seed=2)
    tasks = TaskMix(unconditional=0.2, extension=0.3, interpolation=0.5)
    masked = GridSampleDataset(ct_sequences, spec, strides=(1, 3), seed=2, tasks=tasks, stride_dropout=0.25)
    counts = {(0, 0, 0, 0): 0, (1, 1, 0, 0): 0, (1, 0, 0, 1): 0}
    dropped, n = 0, 1200
    for index in range(n):
        item, same = masked[index], plain[index]
        assert item["id"] == same["id"] and torch.equal(item["x"], same["x"])
        assert item["id"][2] in (1, 3)
        counts[tuple(int(f) for f in item["known"])] += 1             # a KeyError for any other pattern
        assert item["stride_label"] in (0, item["id"][2])
        dropped += item["stride_label"] == 0
        assert "known" not in same and "stride_label" not in same
    for (pattern, count), p in zip(counts.items(), (0.2, 0.3, 0.5)):
        assert abs(count / n - p) < 4 * (p * (1 - p) / n) ** 0.5, (pattern, count)
    assert abs(dropped / n - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5
    again = GridSampleDataset(ct_sequences, spec, strides=(1, 3), seed=2, tasks=tasks, stride_dropout=0.25)
    assert torch.equal(again[17]["known"], masked[17]["known"]) and again[17]["stride_label"] == masked[17]["stride_label"]
    with pytest.raises(ValueError, match="not both"):
        GridSampleDataset(ct_sequences, spec, strides=(1, 3), stride_range=(1, 3))
    with pytest.raises(ValueError, match="control_rows"):
        GridSampleDataset(ct_sequences, spec, tasks=TaskMix(control_rows=2))
    with pytest.raises(ValueError, match="stride_dropout"):
        GridSampleDataset(ct_sequences, spec, stride_dropout=1.0)


def test_each_task_comes_at_its_own_strides(ct_sequences):
    """task_strides: extension and first grids at the coarse stride, interpolation at the fine one (the
    sampler's own use), tasks still in their proportions; a task no sequence can serve is refused."""
    tasks = TaskMix(unconditional=0.2, extension=0.3, interpolation=0.5)
    dataset = GridSampleDataset(ct_sequences, GridSpec(2, 2), strides=(1, 2), seed=5, tasks=tasks,
                                task_strides={"unconditional": [2], "extension": [2], "interpolation": [1]})
    by_task = {(0, 0, 0, 0): set(), (1, 1, 0, 0): set(), (1, 0, 0, 1): set()}
    counts = dict.fromkeys(by_task, 0)
    n = 600
    for index in range(n):
        item = dataset[index]
        pattern = tuple(int(f) for f in item["known"])
        by_task[pattern].add(item["id"][2])
        counts[pattern] += 1
    assert by_task == {(0, 0, 0, 0): {2}, (1, 1, 0, 0): {2}, (1, 0, 0, 1): {1}}
    for count, p in zip(counts.values(), (0.2, 0.3, 0.5)):
        assert abs(count / n - p) < 4 * (p * (1 - p) / n) ** 0.5
    everywhere = GridSampleDataset(ct_sequences, GridSpec(2, 2), strides=(1, 2), seed=5, tasks=tasks,
                                   task_strides={"interpolation": [1]})            # the others take every stride
    items = [everywhere[i] for i in range(200)]
    assert {it["id"][2] for it in items if it["known"][-1] == 0} == {1, 2}              # not interpolation
    assert {it["id"][2] for it in items if it["known"][-1] == 1} == {1}
    with pytest.raises(ValueError, match="extension"):
        GridSampleDataset(ct_sequences, GridSpec(2, 2), strides=(1, 2), tasks=tasks, sequence_strides=[[2], [2]],
                          task_strides={"extension": [1]})
    with pytest.raises(ValueError, match="unknown task"):
        GridSampleDataset(ct_sequences, GridSpec(2, 2), strides=(1, 2), tasks=tasks, task_strides={"extend": [1]})


def test_scans_know_their_own_slice_spacing(ct_sequences):
    assert ct_sequences.slice_spacings == [3.0, 1.5]          # the slab is 3 mm thick, the chest crop 1.5 mm


def test_a_sequence_serves_only_its_strides_and_strides_are_drawn_evenly(ct_sequences):
    """The 3 mm slab (sequence 0) may serve stride 2 only; stride 1 then always comes from the chest crop,
    and each stride is drawn about as often whatever number of sequences serve it."""
    dataset = GridSampleDataset(ct_sequences, GridSpec(2, 2), strides=(1, 2), sequence_strides=[[2], [1, 2]], seed=3)
    seen = {1: set(), 2: set()}
    for index in range(400):
        sequence, _, stride = dataset[index]["id"]
        seen[stride].add(sequence)
    assert seen == {1: {1}, 2: {0, 1}}
    strides = [dataset[i]["id"][2] for i in range(400)]
    assert abs(strides.count(1) / 400 - 0.5) < 4 * (0.25 / 400) ** 0.5
    with pytest.raises(ValueError, match="entries"):
        GridSampleDataset(ct_sequences, GridSpec(2, 2), sequence_strides=[[1]])


def test_first_grids_start_near_the_start_and_jitter_moves_all_cells_alike(ct_sequences):
    tasks = TaskMix(unconditional=1.0, extension=0.0, interpolation=0.0)
    dataset = GridSampleDataset(ct_sequences, GridSpec(2, 2), tasks=tasks, start_within=3, channels=1)
    assert all(dataset[i]["id"][1] < 3 for i in range(50))
    plain = GridSampleDataset(ct_sequences, GridSpec(2, 2), channels=1, seed=4)
    jittered = GridSampleDataset(ct_sequences, GridSpec(2, 2), channels=1, seed=4, jitter=InPlaneJitter(0.2, 0.1))
    a, b = plain[5], jittered[5]
    assert a["id"] == b["id"] and not torch.equal(a["x"], b["x"])
    assert torch.equal(b["x"], jittered[5]["x"])                                     # seeded
    frames = torch.rand(4, 1, 32, 32) * 2 - 1
    moved = InPlaneJitter(scale=0.0, shift=0.0)(frames, torch.Generator().manual_seed(0))
    torch.testing.assert_close(moved, frames, atol=1e-5, rtol=0)                      # identity at zero
    small = InPlaneJitter(scale=0.5, shift=0.0)
    g = torch.Generator().manual_seed(11)
    while True:                                                                        # find a zoom-out draw
        state = g.get_state()
        if float(torch.rand((), generator=g)) < 0.3:
            break
    g.set_state(state)
    out = small(torch.ones(2, 1, 32, 32), g)
    assert float(out[:, :, 0, 0].max()) == -1.0 and float(out[:, :, 16, 16].min()) == 1.0   # air comes in at the edge


def test_lazy_loader_lengths_are_checked(ct_sequences):
    class Lying:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return ct_sequences[0]

        def num_frames(self, i):
            return 100

    with pytest.raises(ValueError, match="num_frames says 100"):
        GridSampleDataset(Lying(), GridSpec(2, 2))[0]


# ------------------------------------------------------------------ stage-2 pairs
def test_sr_pairs_hold_a_real_slice_and_its_degradation(ct_sequences):
    dataset = SRPairDataset(ct_sequences, factor=2, seed=3)
    for index in range(10):
        item = dataset[index]
        sequence, frame = item["id"]
        assert item["x"].shape == item["cond"].shape == (3, 48, 64)
        assert torch.equal(item["x"], ct_sequences[sequence][frame].expand(3, -1, -1))
        assert not torch.equal(item["cond"], item["x"])
        assert torch.equal(item["cond"][0], item["cond"][2])          # degraded before the gray -> RGB repeat
        assert item["cond"].min() >= -1 and item["cond"].max() <= 1
    again = SRPairDataset(ct_sequences, factor=2, seed=3)[4]
    assert torch.equal(again["cond"], dataset[4]["cond"])
    with pytest.raises(ValueError, match="factor"):
        SRPairDataset(ct_sequences, factor=2, degrade=Degrade(4))


# ------------------------------------------------------------------ video
def test_video_frames_through_the_same_datasets(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(12, 24, 32, 3), dtype=np.uint8)
    write_frames(tmp_path / "clip", frames)
    write_video(tmp_path / "clip.mp4", frames, fps=12)
    loaded = list(VideoSequences([tmp_path / "clip", tmp_path / "clip.mp4"]))     # in memory
    assert [s.shape for s in loaded] == [(12, 3, 24, 32)] * 2
    spec = GridSpec(2, 2)
    lazy = GridSampleDataset(VideoSequences([tmp_path / "clip"]), spec, stride_range=(1, 3))  # read per item
    truth = frames_to_sequence(frames)
    for index in range(5):
        item = lazy[index]
        assert item["x"].shape == (3, 48, 64)
        assert torch.equal(cells_of(item, spec), expected_cells(truth, item["id"], spec))  # PNG is lossless
    gray = GridSampleDataset(loaded, spec, channels=1)[0]["x"]
    assert gray.shape == (1, 48, 64)
    pair = SRPairDataset(loaded, factor=2)[0]
    assert pair["x"].shape == pair["cond"].shape == (3, 24, 32)
