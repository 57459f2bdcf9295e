"""Training datasets of both stages, over any collection of frame sequences.

Sequences
---------
A *sequence* is a float tensor ``(N_i, C, H, W)`` in ``[-1, 1]``: the slices of
a CT volume (``C = 1``, from :mod:`ctgridit.ct.sequences`), the frames of a
video (``C = 3``, :class:`~ctgridit.video.adapter.VideoSequences`), ... All sequences of one dataset
share ``C, H, W``. A dataset takes either a list of such tensors or a *lazy
loader* (:class:`FrameSequences`): any object with ``__len__`` and
``__getitem__(i) -> (N_i, C, H, W) tensor`` that reads sequence ``i`` on demand,
optionally with ``num_frames(i) -> N_i`` that answers without reading the
frames (or ``lengths()`` for all at once), and ``frames(i, indices)`` that reads only some frames (a prepared
cache, :mod:`ctgridit.training.cache`). The dataset learns every ``N_i`` once, when it is built: from
``num_frames`` when the loader has it, else by loading each sequence once.

Reproducibility
---------------
Item ``index`` is a pure function of ``(seed, index)``: ``__getitem__`` seeds
its own ``torch.Generator`` with :func:`sample_seed` and draws all its
randomness from it (which sequence, stride, start; the degradation noise and
blur), never from a global RNG. A trainer resumes exactly and splits a global
batch across processes just by choosing indices; each item's ``id`` says which
frames it holds.

``len(dataset)`` is a *virtual* length (``length``, default 10**9): items are
independent random draws (with replacement), so an epoch means nothing; a
trainer walks the indices ``0, 1, 2, ...`` (e.g. ``step * batch + rank ...``).

Items are dicts of float32 tensors in ``[-1, 1]`` with ``channels`` channels:
grayscale sequences are repeated to 3 channels with
:func:`~ctgridit.core.grid.gray_to_rgb` for an RGB codec, RGB ones averaged
with :func:`~ctgridit.core.grid.rgb_to_gray` when ``channels == 1``.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ctgridit.core.conditioning import TASKS, TaskMix
from ctgridit.core.degrade import Degrade
from ctgridit.core.grid import GridSpec, gray_to_rgb, resize_frames, rgb_to_gray, tile

#: The default virtual length of the datasets (see the module docstring).
VIRTUAL_LENGTH = 10**9


class FrameSequences(Protocol):
    """A lazy collection of sequences: ``len(s)`` of them, ``s[i]`` a ``(N_i, C, H, W)`` tensor in [-1, 1].

    A loader may add ``num_frames(i) -> N_i`` (cheap, without reading the
    frames); it must equal ``s[i].shape[0]``.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of a dataset seeded with ``seed`` (a hash, so neighbours are unrelated)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def to_channels(frames: torch.Tensor, channels: int) -> torch.Tensor:
    """``(..., C, H, W)`` frames with ``channels`` channels: unchanged, gray -> RGB (repeat) or RGB -> gray (mean)."""
    have = frames.shape[-3]
    if have == channels:
        return frames
    if (have, channels) == (1, 3):
        return gray_to_rgb(frames)
    if (have, channels) == (3, 1):
        return rgb_to_gray(frames)
    raise ValueError(f"cannot turn {have}-channel frames into {channels} channels (only 1 <-> 3)")


def _randint(high: int, generator: torch.Generator) -> int:
    """A uniform integer in ``[0, high)``."""
    return int(torch.randint(high, (), generator=generator))


class _SequenceDataset(Dataset):
    """What both datasets share: the sequences and their lengths, the virtual length, per-item generators."""

    def __init__(self, sequences: Sequence[torch.Tensor] | FrameSequences, seed: int, length: int,
                 channels: int) -> None:
        if len(sequences) == 0:
            raise ValueError("no sequences given")
        if length < 1 or channels < 1:
            raise ValueError(f"length and channels must be positive, got {length} and {channels}")
        self.sequences = sequences
        self.seed = int(seed)
        self.length = int(length)
        self.channels = int(channels)
        lengths, count = getattr(sequences, "lengths", None), getattr(sequences, "num_frames", None)
        self.num_frames = list(lengths()) if lengths else [count(i) if count else self._load(i, check_length=False).shape[0]
                                                          for i in range(len(sequences))]

    def __len__(self) -> int:
        return self.length

    def generator(self, index: int) -> torch.Generator:
        """The generator of item ``index`` (checked to lie in ``[0, len)``)."""
        index = operator.index(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of virtual length {self.length}")
        return torch.Generator().manual_seed(sample_seed(self.seed, index))

    def _load(self, i: int, check_length: bool = True) -> torch.Tensor:
        """Sequence ``i`` as float32 ``(N_i, C, H, W)``, checked."""
        x = self.sequences[i]
        if not (torch.is_tensor(x) and x.is_floating_point() and x.ndim == 4):
            raise ValueError(f"sequence {i} must be a float tensor (N, C, H, W), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        if check_length and x.shape[0] != self.num_frames[i]:
            raise ValueError(f"sequence {i} has {x.shape[0]} frames but the loader's num_frames says "
                             f"{self.num_frames[i]}")
        return x.float()

    def _frames(self, i: int, indices) -> torch.Tensor:
        """Frames ``indices`` of sequence ``i``: read alone from a loader that can (a prepared cache), else
        sliced out of the whole sequence."""
        read = getattr(self.sequences, "frames", None)
        if read is not None:
            return read(i, indices).float()
        return self._load(i)[indices]


@dataclass(frozen=True)
class InPlaneJitter:
    """A random in-plane zoom and shift, the same for all frames of a grid (data augmentation).

    The zoom is uniform in ``[1 - scale, 1 + scale]``, the shift uniform in
    ``+-shift`` of the frame size along each axis; what comes into view is
    filled with the low end of the range (-1: air for CT, black for video).
    """

    scale: float = 0.1
    shift: float = 0.05

    def __call__(self, frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``(N, C, H, W)`` frames in [-1, 1], moved and zoomed alike (bilinear)."""
        zoom = 1 + self.scale * (2 * float(torch.rand((), generator=generator)) - 1)
        dy, dx = (self.shift * (2 * torch.rand(2, generator=generator, dtype=torch.float64) - 1)).tolist()
        theta = torch.tensor([[1 / zoom, 0, 2 * dx], [0, 1 / zoom, 2 * dy]], dtype=frames.dtype)
        grid = F.affine_grid(theta.expand(len(frames), 2, 3), list(frames.shape), align_corners=False)
        moved = F.grid_sample(frames + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return moved - 1


class GridSampleDataset(_SequenceDataset):
    """Stage-1 training grids: ``R x C`` frames ``k, k+s, ..., k+(RC-1)s`` of one sequence, tiled row-major.

    Args:
        sequences: a list of ``(N_i, C, H, W)`` tensors in [-1, 1] or a lazy
            loader (module docstring).
        spec: grid shape ``R x C`` and in-plane factor ``r`` (``spec.stride`` is
            the default stride).
        stride_range: ``(s_min, s_max)``, inclusive; default ``(spec.stride, spec.stride)``.
        strides: instead of a range, the strides to draw from (e.g. ``(1, 3, 9)``
            for two levels of 2 x 2 interpolation).
        seed, length: see the module docstring.
        channels: channels of the grids (1 keeps gray, 3 for an RGB codec).
        sequence_strides: for each sequence, the strides it may serve (e.g.
            only the coarse ones for a CT scan of thick slices); default all.
        tasks: masked conditioning (:class:`~ctgridit.core.conditioning.TaskMix`):
            each item also draws which of its cells are known.
        stride_dropout: stride labels: each item also carries its stride as a
            label, replaced by 0 ("not given") with this probability.
        start_within: grids with nothing known (the first grid of a sampled
            sequence) start within the first ``start_within`` frames of their
            sequence, so the sampler begins where sequences begin (e.g. below
            the diaphragm for chest CT) instead of anywhere.
        task_strides: with ``tasks``, the strides each task is trained at
            (``{"unconditional": [9], "extension": [9], "interpolation": [1, 3]}``:
            the sampler extends at the coarse stride and interpolates at the
            finer ones, so no grid is spent on a task at a stride it never
            samples); a task missing from it takes every stride. The item
            then draws its task first and its stride among the task's.
        gaps: with ``tasks``, interpolation grids at any factor: such a grid spans a gap of ``g`` frames
            (times the stride; ``g`` drawn among ``gaps``), its first and last cell the frames at both ends, its
            unknown cells frames at offsets drawn uniformly (with replacement, sorted) in ``1 .. g - 1``; the item
            carries the cells' ``positions`` (offsets, frames). One model then fills a gap made ``g`` times finer
            for every ``g`` in ``gaps`` (:func:`~ctgridit.core.conditioning.fill_unknown_cells` reads the
            positions). Other tasks' grids are consecutive frames (positions ``0 .. R*C - 1``).
        jitter: in-plane augmentation (:class:`InPlaneJitter`).
        crop: cut a random ``crop x crop`` tile out of the frames (the same for
            all cells; sequences may then differ in size). A side shorter than
            ``crop`` is first padded at both ends with the low end of the range
            (-1: air for CT, black for video), as the jitter fills.

    Item ``index`` draws with its generator: a stride, uniformly among the
    strides some sequence can serve (serves it and is long enough:
    ``(RC - 1) * s + 1`` frames; none is a ValueError; with ``task_strides``
    the task first, then the stride among the task's); a sequence, uniformly
    among those that can serve it; a start ``k`` uniformly with
    ``k + (RC - 1) * s < N``; then, if asked for, the known cells, the label
    dropout, the start of a grid with nothing known and the jitter. Its frames
    are resized in-plane to ``spec.frame_size(H, W)`` (bicubic,
    :func:`~ctgridit.core.grid.resize_frames`) and tiled with
    :func:`~ctgridit.core.grid.tile`.

    Items: ``{"x": (channels, R*h, C*w) grid, "id": (sequence, start, stride),
    "index": index}``, plus ``"known"`` (``(R*C,)`` flags, 1 = known) with
    ``tasks`` and ``"stride_label"`` with ``stride_dropout``.
    """

    def __init__(self, sequences: Sequence[torch.Tensor] | FrameSequences, spec: GridSpec = GridSpec(),
                 stride_range: tuple[int, int] | None = None, seed: int = 0, length: int = VIRTUAL_LENGTH,
                 channels: int = 3, strides: Sequence[int] | None = None,
                 sequence_strides: Sequence[Sequence[int]] | None = None, tasks: TaskMix | None = None,
                 stride_dropout: float | None = None, start_within: int | None = None,
                 jitter: InPlaneJitter | None = None, crop: int | None = None,
                 task_strides: dict[str, Sequence[int]] | None = None, gaps: Sequence[int] | None = None) -> None:
        if strides is not None and stride_range is not None:
            raise ValueError("give strides or stride_range, not both")
        if strides is None:
            low, high = (spec.stride, spec.stride) if stride_range is None else stride_range
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
                raise ValueError(f"stride_range must be integers (low, high) with 1 <= low <= high, got {stride_range}")
            strides = range(low, high + 1)
        self.strides = sorted(set(operator.index(s) for s in strides))
        if not self.strides or self.strides[0] < 1:
            raise ValueError(f"strides must be positive integers, got {list(strides)}")
        if stride_dropout is not None and not 0.0 <= stride_dropout < 1.0:
            raise ValueError(f"stride_dropout must be in [0, 1), got {stride_dropout}")
        if start_within is not None and start_within < 1:
            raise ValueError(f"start_within must be >= 1, got {start_within}")
        if tasks is not None:
            tasks.check(spec.rows, spec.cols)
        if gaps is not None:
            gaps = sorted({operator.index(g) for g in gaps})
            if tasks is None or tasks.chunk != 1 or not gaps or gaps[0] < 2:
                raise ValueError(f"gaps need tasks with chunk 1 and gaps of at least 2 frames, got {gaps}")
        self.gaps = gaps
        super().__init__(sequences, seed, length, channels)
        if sequence_strides is not None and len(sequence_strides) != len(self.num_frames):
            raise ValueError(f"sequence_strides has {len(sequence_strides)} entries for {len(self.num_frames)} sequences")
        self.spec, self.tasks, self.stride_dropout = spec, tasks, stride_dropout
        self.start_within, self.jitter, self.crop = start_within, jitter, crop
        allowed = [set(self.strides) if sequence_strides is None else set(sequence_strides[i]) & set(self.strides)
                   for i in range(len(self.num_frames))]
        #: for every stride some sequence can serve, the sequences that can
        self.servers = {s: [i for i, n in enumerate(self.num_frames) if s in allowed[i] and self.span(s) <= n]
                        for s in self.strides}
        self.servers = {s: seqs for s, seqs in self.servers.items() if seqs}
        if not self.servers:
            low = min(min(a) for a in allowed if a) if any(allowed) else self.strides[0]
            raise ValueError(f"no sequence is long enough for a {spec.rows}x{spec.cols} grid at stride {low}: "
                             f"it needs {self.span(low)} frames, the longest has {max(self.num_frames)}")
        self.task_strides = None
        if task_strides is not None:
            if tasks is None:
                raise ValueError("task_strides needs tasks")
            unknown = set(task_strides) - set(TASKS)
            if unknown:
                raise ValueError(f"task_strides names unknown task(s) {sorted(unknown)}; tasks are {TASKS}")
            self.task_strides = {task: sorted(s for s in self.servers if s in task_strides.get(task, self.servers))
                                 for task in TASKS}
            empty = [task for task, weight in zip(TASKS, tasks.weights) if weight > 0 and not self.task_strides[task]]
            if empty:
                raise ValueError(f"no sequence serves the strides task_strides gives the {' and '.join(empty)} "
                                 f"task: {[list(task_strides.get(t, [])) for t in empty]}")

    def span(self, stride: int) -> int:
        """Frames of the sequence covered by one grid at ``stride``: ``(RC - 1) * s + 1``."""
        return (self.spec.cells - 1) * stride + 1

    def __getitem__(self, index: int) -> dict:
        g = self.generator(index)
        task = self.tasks.draw_task(g) if self.task_strides is not None or self.gaps is not None else None
        served = self.task_strides[task] if self.task_strides is not None else sorted(self.servers)
        stride = served[_randint(len(served), g)]
        i = self.servers[stride][_randint(len(self.servers[stride]), g)]
        n = self.num_frames[i]
        start = _randint(n - self.span(stride) + 1, g)
        item = {"index": index}
        if self.tasks is not None:
            flags = self.tasks.known(task, self.spec.rows, self.spec.cols) if task is not None \
                else self.tasks.draw(g, self.spec.rows, self.spec.cols)
            item["known"] = torch.tensor(flags)
        if self.stride_dropout is not None:
            dropped = float(torch.rand((), generator=g)) < self.stride_dropout
            item["stride_label"] = 0 if dropped else stride
        if self.start_within is not None and not bool(item.get("known", torch.zeros(1)).any()):
            start = _randint(min(self.start_within, n - self.span(stride) + 1), g)
        offsets = list(range(self.spec.cells))
        if task == "interpolation" and self.gaps is not None:
            fit = [gap for gap in self.gaps if gap * stride < n] or [self.gaps[0]]
            gap = fit[_randint(len(fit), g)]
            inner = sorted(1 + _randint(gap - 1, g) for _ in range(self.spec.cells - 2))
            offsets = [0, *inner, gap]
            start = _randint(max(1, n - gap * stride), g)
        if self.gaps is not None:
            item["positions"] = torch.tensor(offsets, dtype=torch.float32)
        at = slice(start, start + self.span(stride), stride) if offsets == list(range(self.spec.cells)) else \
            [min(start + o * stride, n - 1) for o in offsets]
        frames = self._frames(i, at)                                               # (R*C, C, H, W)
        if self.crop is not None:
            height, width = frames.shape[-2:]
            if min(height, width) < self.crop:
                dy, dx = max(self.crop - height, 0), max(self.crop - width, 0)
                frames = F.pad(frames, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2), value=-1.0)
                height, width = frames.shape[-2:]
            y, x = _randint(height - self.crop + 1, g), _randint(width - self.crop + 1, g)
            frames = frames[..., y:y + self.crop, x:x + self.crop]
        if self.jitter is not None:
            frames = self.jitter(frames, g)
        cells = resize_frames(frames, self.spec.frame_size(*frames.shape[-2:]))    # (R*C, C, h, w)
        grid = tile(cells, self.spec.rows, self.spec.cols)                         # (C, R*h, C*w)
        item.update(x=to_channels(grid, self.channels).contiguous(), id=(i, start, stride))
        return item


class SRPairDataset(_SequenceDataset):
    """Stage-2 training pairs: a real HR frame and its degraded version (:class:`~ctgridit.core.degrade.Degrade`).

    Args:
        sequences: as for :class:`GridSampleDataset`.
        factor: the stage-1 in-plane factor ``r`` the SR model undoes.
        degrade: the degradation; default ``Degrade(factor)`` (docs/METHOD.md section 4).
            Its factor must be ``factor``.
        seed, length, channels: as for :class:`GridSampleDataset`.

    Item ``index`` draws with its generator a sequence (uniformly), a frame
    (uniformly) and the degradation. The frame is degraded in its own channels
    before the channel conversion, so a gray frame keeps a gray condition.

    Items: ``{"x": (channels, H, W) HR frame, "cond": (channels, H, W) degraded
    frame, "id": (sequence, frame), "index": index}``.
    """

    def __init__(self, sequences: Sequence[torch.Tensor] | FrameSequences, factor: int,
                 degrade: Degrade | None = None, seed: int = 0, length: int = VIRTUAL_LENGTH,
                 channels: int = 3) -> None:
        degrade = Degrade(factor) if degrade is None else degrade
        if degrade.factor != factor:
            raise ValueError(f"the degradation's factor {degrade.factor} differs from factor {factor}")
        super().__init__(sequences, seed, length, channels)
        self.factor = factor
        self.degrade = degrade

    def __getitem__(self, index: int) -> dict:
        g = self.generator(index)
        i = _randint(len(self.num_frames), g)
        frame_index = _randint(self.num_frames[i], g)
        frame = self._frames(i, slice(frame_index, frame_index + 1))[0]             # (C, H, W)
        cond, _ = self.degrade(frame, g)                                           # (C, H, W)
        return {"x": to_channels(frame, self.channels).contiguous(),
                "cond": to_channels(cond, self.channels).contiguous(),
                "id": (i, frame_index), "index": index}
