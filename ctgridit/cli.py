"""The ``ctgridit`` command line: thin wrappers over the Python API.

Every command parses its arguments, calls one library function and prints the
result. A :class:`~ctgridit.errors.CTGridItError` becomes one line on stderr,
``error: ...``, and exit code 2; warnings become ``warning: ...`` lines.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional

import typer

from ctgridit import __version__
from ctgridit.errors import CTGridItError, CTGridItWarning
from ctgridit.limits import MAX_FRAMES, MAX_SLICES, MIN_FRAMES, MIN_SLICES
from ctgridit.seeds import SEED_MAX

app = typer.Typer(
    name="ctgridit",
    help="GriDiT for CT: synthesise, denoise and inspect CT volumes with grid diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctgridit {__version__}")
        raise typer.Exit()


#: Set to anything but 0 to see, behind every one-line error, its full traceback and cause (as ``--debug`` does).
DEBUG_ENV = "CTGRIDIT_DEBUG"
_debug = {"on": False}


def debugging() -> bool:
    """Whether errors show their traceback: ``--debug`` or ``$CTGRIDIT_DEBUG``."""
    return _debug["on"] or os.environ.get(DEBUG_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help=f"Show the full traceback (and its cause) behind an "
                                     f"error line; {DEBUG_ENV}=1 does the same.")) -> None:
    """GriDiT for CT: synthesise, denoise and inspect CT volumes with grid diffusion transformers."""
    _debug["on"] = debug


#: What ``synth`` makes without ``--slices`` / ``--frames``.
DEFAULT_SLICES = 201
DEFAULT_FRAMES = 32

SERIES_HELP = "DICOM only: the SeriesInstanceUID to read when a folder holds several series (default: the one with most slices)."


@app.command(epilog="Example: ctgridit info scan.nii.gz --json")
def info(
    path: str = typer.Argument(..., help="A NIfTI, NRRD/MHA file, a DICOM series folder or a zip of one."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (keys shape, spacing, orientation, hu, ...)."),
    series: Optional[str] = typer.Option(None, "--series", help=SERIES_HELP),
) -> None:
    """Show a CT volume's shape, spacing, orientation and HU statistics."""
    from ctgridit.ct.io import read_ct
    from ctgridit.ct.summary import describe, format_summary

    summary = describe(read_ct(path, series_uid=series))
    typer.echo(json.dumps(summary) if as_json else format_summary(summary))


@app.command(epilog="Example: ctgridit convert dicom_folder/ scan.nii.gz")
def convert(
    src: str = typer.Argument(..., metavar="IN", help="Any supported input (NIfTI, NRRD/MHA, DICOM folder or zip)."),
    out: str = typer.Argument(..., metavar="OUT.nii.gz", help="The NIfTI file to write (int16 HU)."),
    series: Optional[str] = typer.Option(None, "--series", help=SERIES_HELP),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists."),
) -> None:
    """Convert a CT volume to NIfTI (int16 HU, qform and sform set)."""
    from ctgridit.ct.io import read_ct, write_nifti
    from ctgridit.files import check_output_path

    _require_nifti_name(out)
    _refuse_overwriting_input(src, [out])
    check_output_path(out, force=force)          # refuse early, before reading a large series
    volume = read_ct(src, series_uid=series)
    write_nifti(volume, out, force=force)
    typer.echo(f"wrote {out} ({' x '.join(map(str, volume.shape))} voxels, {volume.orientation})")


@app.command(epilog="Example: ctgridit grid scan.nii.gz --out grids/ --rows 2 --cols 2 --stride 2 --factor 2")
def grid(
    src: str = typer.Argument(..., metavar="IN", help="Any supported CT input."),
    out: str = typer.Option(..., "--out", "-o", help="Folder for the grid PNG files (created if needed)."),
    rows: int = typer.Option(2, "--rows", min=1, help="Grid rows R."),
    cols: int = typer.Option(2, "--cols", min=1, help="Grid columns C."),
    stride: int = typer.Option(1, "--stride", min=1, help="Slice stride s between neighbouring cells."),
    factor: int = typer.Option(1, "--factor", min=1, help="In-plane downsampling factor r."),
    window: str = typer.Option("wide", "--window", help="HU window: wide (-1000:1000, the model's), lung, mediastinum, soft, bone or MIN:MAX."),
    series: Optional[str] = typer.Option(None, "--series", help=SERIES_HELP),
    force: bool = typer.Option(False, "--force", "-f", help="Replace OUT if it exists and is not empty."),
) -> None:
    """Write the grids the model sees (R x C slices per image, row-major) as PNG files."""
    from ctgridit.core.grid import GridSpec
    from ctgridit.ct.grid_images import write_grid_images
    from ctgridit.ct.io import read_ct
    from ctgridit.ct.window import parse_window
    from ctgridit.files import check_output_folder

    spec = GridSpec(rows, cols, stride, factor)
    hu_window = parse_window(window)
    check_output_folder(out, force=force)           # refuse early, before reading a large series
    volume = read_ct(src, series_uid=series)
    paths = write_grid_images(volume, out, spec, hu_window, force=force)
    typer.echo(f"wrote {len(paths)} grid images to {out} ({rows}x{cols}, stride {stride}, factor {factor})")


@app.command(epilog="Example: ctgridit preview scan.nii.gz --out preview.png --window lung")
def preview(
    src: str = typer.Argument(..., metavar="IN", help="Any supported CT input."),
    out: str = typer.Option(..., "--out", "-o", help="The PNG file to write."),
    window: str = typer.Option("wide", "--window", help="HU window: wide (-1000:1000), lung, mediastinum, soft, bone or MIN:MAX."),
    series: Optional[str] = typer.Option(None, "--series", help=SERIES_HELP),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists."),
) -> None:
    """Draw the axial, coronal and sagittal mid-planes side by side (spacing-aware)."""
    from ctgridit.ct.io import read_ct
    from ctgridit.ct.preview import save_preview
    from ctgridit.ct.window import parse_window
    from ctgridit.files import check_output_path

    _require_suffix(out, ".png")
    check_output_path(out, force=force)
    hu_window = parse_window(window)
    volume = read_ct(src, series_uid=series)
    save_preview(volume, out, hu_window, title=Path(src).name, force=force)
    typer.echo(f"wrote {out}")


@app.command(epilog="Example: ctgridit synth --slices 201 --out vol.nii.gz --seed 0 --preview vol.png\n\n"
                     "Video: ctgridit synth --model runs/video_shapes/model --frames 48 --out clip.mp4\n\n"
                     "Many GPUs: torchrun --nproc_per_node 8 -m ctgridit synth -n 1000 --out volumes/")
def synth(
    slices: Optional[int] = typer.Option(None, "--slices", min=MIN_SLICES, max=MAX_SLICES, help=f"CT models: number of axial slices, {MIN_SLICES} .. {MAX_SLICES} (default {DEFAULT_SLICES})."),
    frames: Optional[int] = typer.Option(None, "--frames", min=MIN_FRAMES, max=MAX_FRAMES, help=f"Video models: number of frames, {MIN_FRAMES} .. {MAX_FRAMES} (default {DEFAULT_FRAMES})."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="CT: the NIfTI file to write (default vol.nii.gz), or a folder (ending in /) for vol_00000.nii.gz, ...; video: an .mp4 or .gif file (default clip.mp4), or a name without suffix for a folder of PNG frames."),
    num: int = typer.Option(1, "--num", "-n", min=1, help="How many volumes or clips (OUT_000.nii.gz, ... or the folder's vol_NNNNN.nii.gz); under torchrun write -n (torchrun reads --num as its own --numa-binding)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help=f"Random seed, 0 .. {SEED_MAX}: the same seed gives the same output."),
    model: Optional[str] = typer.Option(None, "--model", help="A model folder saved by the trainer, or a bundled model by name (ct_chest, the default; video_shapes, moving squares); a video model writes clips."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Denoising steps per grid (default: the model's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps (under torchrun: one GPU per process)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16 (half precision on GPUs)."),
    preview_png: Optional[str] = typer.Option(None, "--preview", help="Also write a PNG: the three mid-planes of a volume, the frames of a clip."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Generate CT volumes of any number of slices, or video clips of any number of frames, with the grid diffusion model.

    The model folder's adapter decides what is written: a CT model NIfTI volumes (--slices), a video model clips
    at its training clips' frame rate (--frames). Started with torchrun, the processes share the outputs (output i
    on process i mod N); output i always comes from the same seed, so the files do not depend on the number of
    processes.
    """
    from ctgridit.core.loading import is_model_folder
    from ctgridit.model_folders import default_model_dir, model_kind
    from ctgridit.seeded_runs import DTYPES

    if dtype not in DTYPES:
        raise CTGridItError(f"unknown --dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    folder = model if model is not None else default_model_dir()
    kind = model_kind(folder) if model is not None or is_model_folder(folder) else "ct"   # none: said when opened
    if kind not in ("ct", "video"):
        raise CTGridItError(f"is a model of the {kind!r} adapter; synth writes CT volumes and video clips", folder,
                            f"turn its frames into output with ctgridit.adapters.get_adapter({kind!r}).to_output")
    if kind == "video":
        if slices is not None:
            raise CTGridItError("is a video model; --slices is for CT models", model, "give --frames N")
        _synth_clips(frames or DEFAULT_FRAMES, out or "clip.mp4", num, seed, model, steps, device, dtype,
                     preview_png, force, quiet)
        return
    if frames is not None:
        raise CTGridItError("is a CT model; --frames is for video models", model or "the bundled model",
                            "give --slices N, or --model a folder trained on videos")
    _synth_volumes(slices or DEFAULT_SLICES, out or "vol.nii.gz", num, seed, model, steps, device, dtype,
                   preview_png, force, quiet)


def _synth_volumes(slices: int, out: str, num: int, seed: int, model: str | None, steps: int | None, device: str,
                   dtype: str, preview_png: str | None, force: bool, quiet: bool) -> None:
    from ctgridit.ct.io import write_nifti
    from ctgridit.ct.preview import save_preview
    from ctgridit.device import process_device, process_rank
    from ctgridit.files import check_output_path, is_clip_file, output_group
    from ctgridit.progress import PhaseProgress
    from ctgridit.ct.synthesis import load_model, synthesize_iter

    rank, world = process_rank()
    if is_clip_file(out):
        raise CTGridItError("a CT model writes NIfTI volumes, not video", out,
                            "use a name ending in .nii.gz, or give --model a folder trained on videos")
    outputs = volume_paths(out, num)
    previews = volume_paths(preview_png, num, ".png") if preview_png else []
    if preview_png and not out.endswith(("/", os.sep)):
        _require_suffix(preview_png, ".png")
    if not out.endswith(("/", os.sep)):
        _require_nifti_name(out)
    else:
        Path(out).mkdir(parents=True, exist_ok=True)
    mine = range(rank, num, world)
    for i in mine:                                        # refuse before minutes of work
        for path in [outputs[i]] + ([previews[i]] if previews else []):
            check_output_path(path, force=force)
    pipeline = load_model(model, process_device(device))
    with PhaseProgress(enabled=not quiet and rank == 0) as progress:
        for i, volume in synthesize_iter(slices, mine, seed, pipeline, steps, dtype=dtype, progress=progress):
            with output_group():                                      # each volume (and its preview) when done
                write_nifti(volume, outputs[i], force=force)
                if previews:
                    save_preview(volume, previews[i], title=f"{Path(outputs[i]).name} (seed {seed})", force=force)
            if not quiet:
                progress.close()
                typer.echo(f"wrote {outputs[i]} ({' x '.join(map(str, volume.shape))} voxels of "
                           f"{' x '.join(f'{s:g}' for s in volume.spacing)} mm)" + (f" and {previews[i]}" if previews else ""))


def _synth_clips(frames: int, out: str, num: int, seed: int, model: str, steps: int | None, device: str,
                 dtype: str, preview_png: str | None, force: bool, quiet: bool) -> None:
    from ctgridit.device import process_device, process_rank
    from ctgridit.files import CLIP_SUFFIXES, check_output_path, is_clip_file, output_group
    from ctgridit.progress import PhaseProgress
    from ctgridit.video.synthesis import (clip_frame_rate, load_video_model, save_clip, save_contact_sheet,
                                      synthesize_clips_iter)
    from ctgridit.video.io import check_frames_folder

    rank, world = process_rank()
    name = out.rstrip("/" + os.sep)
    if name.lower().endswith((".nii", ".nii.gz")):
        raise CTGridItError("a video model writes .mp4, .gif or a folder of PNG frames, not NIfTI", out,
                            "use a name ending in .mp4 or .gif, or give --model a folder trained on CT volumes")
    if Path(name).suffix and not is_clip_file(name):
        raise CTGridItError(f"cannot write {Path(name).suffix} clips", out,
                            f"use a name ending in {' or '.join(CLIP_SUFFIXES)}, or one without suffix for PNG frames")
    outputs = numbered(name, num)
    previews = numbered(preview_png, num) if preview_png else []
    if preview_png:
        _require_suffix(preview_png, ".png")
    mine = range(rank, num, world)
    for i in mine:                                        # refuse before minutes of work
        if is_clip_file(outputs[i]):
            check_output_path(outputs[i], force=force)
        else:
            check_frames_folder(Path(outputs[i]), force=force)
        if previews:
            check_output_path(previews[i], force=force)
    pipeline = load_video_model(model, process_device(device))
    fps = clip_frame_rate(pipeline)
    with PhaseProgress(enabled=not quiet and rank == 0) as progress:
        for i, clip in synthesize_clips_iter(frames, mine, seed, pipeline, steps, dtype=dtype, progress=progress):
            with output_group():
                save_clip(clip, outputs[i], fps, force=force)
                if previews:
                    save_contact_sheet(clip, previews[i], force=force)
            if not quiet:
                progress.close()
                h, w = clip.shape[-2:]
                typer.echo(f"wrote {outputs[i]} ({len(clip)} frames of {w} x {h} at {fps:g} fps)"
                           + (f" and {previews[i]}" if previews else ""))


def volume_paths(out: str, count: int, suffix: str = ".nii.gz") -> list[str]:
    """Output names: a folder (ending in /) gives ``vol_00000`` + suffix, ...; else :func:`numbered`."""
    if out.endswith(("/", os.sep)):
        stem = "vol" if suffix == ".nii.gz" else "preview"
        return [str(Path(out) / f"{stem}_{i:05d}{suffix}") for i in range(count)]
    return numbered(out, count)


@app.command(epilog="Example: ctgridit denoise noisy.nii.gz --reference clean.nii.gz --report report.json --preview d.png")
def denoise(
    src: str = typer.Argument(..., metavar="IN", help="The noisy CT (NIfTI, NRRD/MHA, DICOM folder or zip)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="The NIfTI file to write (default: IN_denoised.nii.gz next to IN)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="A clean scan of the same grid: report PSNR and SSIM."),
    report: Optional[str] = typer.Option(None, "--report", help="Write the run and the PSNR/SSIM figures to this JSON file."),
    noise: str = typer.Option("auto", "--noise", help="The noise to remove, its standard deviation in HU (read off a flat region, or known from the protocol), or auto (estimated)."),
    strength: str = typer.Option("auto", "--strength", help="For experiments, instead of --noise: the diffusion level t*/T in (0, 1] (gridit)."),
    no_guard: bool = typer.Option(False, "--no-guard", help="Do not blend gridit's output with the input by its estimated error (SURE)."),
    no_wiener: bool = typer.Option(False, "--no-wiener", help="Do not refine gridit's output by the Wiener filter of the input it pilots (DCT blocks)."),
    method: str = typer.Option("gridit", "--method", help="gridit (the grid diffusion model), bilateral, nlm or nlm3d (classical baselines: per slice, 3D)."),
    model: Optional[str] = typer.Option(None, "--model", help="A model folder saved by the trainer (default: the bundled denoiser)."),
    steps: int = typer.Option(1, "--steps", min=1, help="Reverse diffusion steps from t* (1: the posterior mean; more draw a sample)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help=f"Random seed of the fresh noise (gridit), 0 .. {SEED_MAX}."),
    series: Optional[str] = typer.Option(None, "--series", help=SERIES_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", help="The model's arithmetic: auto (bfloat16 on CPUs with AMX or AVX-512 BF16, else fp32), fp32 or bf16."),
    preview_png: Optional[str] = typer.Option(None, "--preview", help="Also write a PNG of the three mid-planes of the output."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no figures on the terminal."),
) -> None:
    """Denoise a CT volume (the paper's Algorithm 3, or a classical filter); same grid and geometry as IN."""
    from ctgridit.ct.io import read_ct, write_nifti
    from ctgridit.ct.preview import save_preview
    from ctgridit.ct.denoising import METHODS, denoise_summary, denoise_volume, read_reference
    from ctgridit.ct.fidelity import QUALITY_REASONS
    from ctgridit.files import atomic_output, check_output_path, output_group, report_json
    from ctgridit.progress import PhaseProgress

    if method not in METHODS:
        raise CTGridItError(f"unknown method {method!r}", "--method", f"use one of {', '.join(METHODS)}")
    _check_precision(precision)
    level = _strength(strength)
    told = _noise(noise)
    if told != "auto" and level != "auto":
        raise CTGridItError("give the noise in HU or the strength, not both", "--strength",
                            "leave --strength out: --noise says how much to remove")
    if method != "gridit" and level != "auto":
        warnings.warn(f"--strength {strength} applies to --method gridit; {method} follows the estimated noise",
                      CTGridItWarning)
    out = out or derived_name(src, "denoised")
    _require_nifti_name(out)
    if preview_png:
        _require_suffix(preview_png, ".png")
    if report:
        _require_suffix(report, ".json")
    _refuse_overwriting_input(src, [out, preview_png, report], reference)
    for path in [out] + [p for p in (preview_png, report) if p]:
        check_output_path(path, force=force)
    volume = read_ct(src, series_uid=series)
    clean = read_reference(reference, volume) if reference is not None else None
    with PhaseProgress(enabled=not quiet) as progress:
        result = denoise_volume(volume, method, level, model, device, seed, steps, progress, told, not no_guard,
                                not no_wiener, precision)
    summary = {"input": str(src), "output": str(out), "reference": reference, **denoise_summary(volume, result, clean)}
    with output_group():                                      # the volume, its preview and report: together
        write_nifti(result.volume, out, force=force)
        if preview_png:
            save_preview(result.volume, preview_png, title=f"{Path(out).name} ({method})", force=force)
        if report:
            with atomic_output(report, force=force) as tmp:
                tmp.write_text(report_json(summary, QUALITY_REASONS))
    if not quiet:
        d = result.details
        guard = f", kept {d['sure']['weight']:.2f} of it (SURE)" if "sure" in d else ""
        guard += (f", Wiener-filtered at {d['wiener']['sigma_hu']:.1f} HU in {'x'.join(map(str, d['wiener']['block']))}"
                  f" blocks (pilot: {d['wiener']['pilot']})" if "wiener" in d else "")
        typer.echo(f"wrote {out} ({method}, {result.seconds:.1f} s): noise estimated {d['noise_estimated_hu']:.1f} HU, "
                   f"removed {d.get('noise_removed_hu', 0.0):.1f} HU{guard}")
        if clean is not None:
            typer.echo(_quality_table(summary["input_quality"], summary["output_quality"]))


def derived_name(src: str, tag: str) -> str:
    """``IN_<tag>.nii.gz`` next to ``IN`` (the folder's or zip's name for DICOM)."""
    p = Path(src.rstrip("/\\"))
    name = p.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".zip"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return str(p.with_name(f"{name}_{tag}.nii.gz"))


#: The options ``interpolate`` and ``extend`` share, one definition each: name -> (type, typer option).
SLICE_OPTIONS = {
    "model": (Optional[str], typer.Option(None, "--model", help="A native-resolution masked-conditional model folder (default: the bundled ct_interpolate).")),
    "steps": (Optional[int], typer.Option(None, "--steps", min=1, max=1000, help="DDIM steps (default the model's; 1: the model's posterior mean; the bundled model serves 1 only).")),
    "seed": (int, typer.Option(0, "--seed", min=0, max=SEED_MAX, help=f"Random seed (matters with --steps > 1), 0 .. {SEED_MAX}.")),
    "series": (Optional[str], typer.Option(None, "--series", help=SERIES_HELP)),
    "device": (str, typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")),
    "precision": (str, typer.Option("auto", "--precision", help="The model's arithmetic: auto (bfloat16 on CPUs with AMX or AVX-512 BF16, else fp32), fp32 or bf16.")),
    "preview_png": (Optional[str], typer.Option(None, "--preview", help="Also write a PNG of the three mid-planes of the output.")),
    "force": (bool, typer.Option(False, "--force", "-f", help="Overwrite existing outputs.")),
    "quiet": (bool, typer.Option(False, "--quiet", "-q", help="No progress bar.")),
}


def with_slice_options(command):
    """``command`` with :data:`SLICE_OPTIONS` added to its signature, after its own parameters.

    typer builds the command line from the signature and passes the shared
    options to the command's ``**options``.
    """
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
              for name, (kind, option) in SLICE_OPTIONS.items()]
    command.__signature__ = signature.replace(parameters=own + shared)
    return command


@app.command(epilog="Example: ctgridit interpolate thick.nii.gz --factor 3 --out thin.nii.gz --preview thin.png")
@with_slice_options
def interpolate(
    src: str = typer.Argument(..., metavar="IN", help="The CT with thick slices (NIfTI, NRRD/MHA, DICOM folder or zip)."),
    factor: int = typer.Option(3, "--factor", min=2, max=16, help="Slices this many times closer (the bundled model: 2 to 5; linear, cubic and flow: any)."),
    method: str = typer.Option("gridit", "--method", help="gridit (the grid model), or linear or cubic interpolation along z, or flow (along the motion between slices)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="The NIfTI file to write (default: IN_xFACTOR.nii.gz next to IN)."),
    **options,
) -> None:
    """Thin slices from thick ones: every slice of IN kept exactly, FACTOR - 1 new ones between each two.

    It thins the scan's slice axis: its thickest voxel axis (where the voxels are about as thick along two or
    three axes: the head-feet axis if it is one of them, else the stored slice direction).

    The bundled grid model fills the new slices of each gap (factors 2 to 5) two at a time, starting from
    the two known slices moved along the motion between them (docs/slices.md has its measurements)."""
    from ctgridit.ct.slices import METHODS, interpolate_volume, interpolation_plan

    if method not in METHODS:
        raise CTGridItError(f"unknown method {method!r}", "--method", f"use one of {', '.join(METHODS)}")
    o = options
    _new_slices(src, out or derived_name(src, f"x{factor}"), o,
                lambda volume, progress: interpolate_volume(volume, factor, o["model"], o["device"], o["seed"],
                                                            o["steps"], progress, method,
                                                            precision=o["precision"]),
                interpolation_plan(factor))


@app.command(epilog="Example: ctgridit extend scan.nii.gz --slices 20 --direction up --out longer.nii.gz")
@with_slice_options
def extend(
    src: str = typer.Argument(..., metavar="IN", help="The CT to continue (NIfTI, NRRD/MHA, DICOM folder or zip)."),
    slices: int = typer.Option(..., "--slices", min=1, max=MAX_SLICES, help="How many slices to add."),
    direction: str = typer.Option("up", "--direction", help="up (towards the head; a sagittal or coronal stack: its left or back end) or down."),
    method: str = typer.Option("gridit", "--method", help="gridit (the motion mixed with the grid model, as far as that helps on the scan's own end), or flow (the last slice moved further along the motion from the one before it)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="The NIfTI file to write (default: IN_upN.nii.gz or IN_downN.nii.gz next to IN)."),
    **options,
) -> None:
    """Continue a scan by N slices up or down: every slice of IN kept exactly.

    It continues the scan's slice axis (its thickest voxel axis, as interpolate): up is towards the head for an
    axial scan, towards the patient's left or back for a sagittal or coronal stack."""
    from ctgridit.ct.slices import EXTEND_METHODS, check_direction, extend_volume, extension_plan

    check_direction(direction)
    if method not in EXTEND_METHODS:
        raise CTGridItError(f"unknown method {method!r}", "--method", f"use one of {', '.join(EXTEND_METHODS)}")
    o = options
    _new_slices(src, out or derived_name(src, f"{direction}{slices}"), o,
                lambda volume, progress: extend_volume(volume, slices, direction, o["model"], o["device"], o["seed"],
                                                       o["steps"], progress, precision=o["precision"], method=method),
                extension_plan(slices))


def _check_precision(precision: str) -> None:
    from ctgridit.core.precision import PRECISIONS

    if precision not in PRECISIONS:
        raise CTGridItError(f"unknown precision {precision!r}", "--precision", f"use one of {', '.join(PRECISIONS)}")


def _new_slices(src: str, out: str, options: dict, run, plan) -> None:
    """What ``interpolate`` and ``extend`` share: check the outputs, read (refused from the header when the result,
    ``plan``, would not fit in memory), run with progress, write."""
    from ctgridit.ct.io import read_ct, write_nifti
    from ctgridit.ct.preview import save_preview
    from ctgridit.files import check_output_path, output_group
    from ctgridit.limits import planned_output
    from ctgridit.progress import PhaseProgress

    preview_png, force, quiet = options["preview_png"], options["force"], options["quiet"]
    _check_precision(options["precision"])
    _require_nifti_name(out)
    if preview_png:
        _require_suffix(preview_png, ".png")
    _refuse_overwriting_input(src, [out, preview_png])
    for path in [out] + [p for p in (preview_png,) if p]:
        check_output_path(path, force=force)
    with planned_output(plan):
        volume = read_ct(src, series_uid=options["series"])
    with PhaseProgress(enabled=not quiet) as progress:
        result = run(volume, progress)
    with output_group():
        write_nifti(result.volume, out, force=force)
        if preview_png:
            save_preview(result.volume, preview_png, title=Path(out).name, force=force)
    if not quiet:
        before, after = result.details["slices"]
        spacing = result.details["slice_spacing_mm"]
        kept, refined = result.details.get("correction_weight"), result.details.get("refiner_weight")
        note = "" if kept is None else (f"; kept {kept:.2f} of the model's correction of its fill"
                                        + ("" if refined is None else f" and {refined:.2f} of its refinement")
                                        + ", checked on the scan's own slices")
        if "model_weight" in result.details:
            share = result.details["model_weight"]
            note = ("; the motion alone: too few slices to check the model on the scan's own end" if share is None
                    else f"; mixed {share:.2f} of the model's extension into the motion's, checked on the scan's own end")
        typer.echo(f"wrote {out} ({before} -> {after} slices, {result.seconds:.1f} s; slice spacing {spacing} mm{note})")


def _auto_or_number(value: str, option: str, low: float, high: float, what: str, example: str) -> float | str:
    """``"auto"``, or ``value`` as a number in ``(low, high]``; else one error naming ``option``."""
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not low < number <= high:
        raise CTGridItError(f"must be auto or {what}, got {value!r}", option,
                            f"try {option} auto, or e.g. {option} {example}")
    return number


def _strength(value: str) -> float | str:
    return _auto_or_number(value, "--strength", 0.0, 1.0, "a number in (0, 1]", "0.05")


def _noise(value: str) -> float | str:
    return _auto_or_number(value, "--noise", 0.0, 9_999.0, "a standard deviation in HU above 0", "30")


def _quality_table(before: dict, after: dict) -> str:
    rows = [f"{'':8}{'PSNR dB':>9}{'SSIM':>8}{'PSNR body':>11}{'SSIM body':>11}"]
    for name, q in (("input", before), ("output", after)):
        rows.append(f"{name:8}{q['psnr']:>9.2f}{q['ssim']:>8.3f}{q['psnr_body']:>11.2f}{q['ssim_body']:>11.3f}")
    return "\n".join(rows)


@app.command("add-noise", epilog="Example: ctgridit add-noise clean.nii.gz --sigma 50 --out noisy.nii.gz --seed 0")
def add_noise_command(
    src: str = typer.Argument(..., metavar="IN", help="The clean CT (NIfTI, NRRD/MHA, DICOM folder or zip)."),
    sigma: float = typer.Option(..., "--sigma", help="Noise standard deviation in HU (in water for lowdose)."),
    out: str = typer.Option(..., "--out", "-o", help="The NIfTI file to write."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help=f"Random seed, 0 .. {SEED_MAX}."),
    noise_model: str = typer.Option("gaussian", "--model", help="gaussian (white, in HU) or lowdose (Poisson, projection-free approximation)."),
    series: Optional[str] = typer.Option(None, "--series", help=SERIES_HELP),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists."),
) -> None:
    """Add Gaussian or simulated low-dose noise to a CT volume, to make denoising test inputs."""
    from ctgridit.ct.io import read_ct, write_nifti
    from ctgridit.ct.noise import add_noise, check_noise
    from ctgridit.files import check_output_path

    check_noise(sigma, noise_model)
    _require_nifti_name(out)
    _refuse_overwriting_input(src, [out])
    check_output_path(out, force=force)
    noisy = add_noise(read_ct(src, series_uid=series), sigma, noise_model, seed)
    write_nifti(noisy, out, force=force)
    typer.echo(f"wrote {out} ({noise_model} noise, sigma {sigma:g} HU, seed {seed})")


def numbered(path: str, count: int) -> list[str]:
    """``[path]`` for one output, else ``stem_000.ext, stem_001.ext, ...`` (``.nii.gz`` kept whole)."""
    if count == 1:
        return [path]
    p = Path(path)
    suffix = ".nii.gz" if p.name.lower().endswith(".nii.gz") else p.suffix
    stem = p.name[: len(p.name) - len(suffix)] if suffix else p.name
    return [str(p.with_name(f"{stem}_{i:03d}{suffix}")) for i in range(count)]


@app.command(epilog="Example: ctgridit evaluate --real ct_rate_valid/ --generated volumes/ --features fid_net.pt --report eval.json")
def evaluate(
    real: str = typer.Option(..., "--real", help="Folder of real NIfTI volumes."),
    generated: str = typer.Option(..., "--generated", help="Folder of generated NIfTI volumes."),
    features: Optional[str] = typer.Option(None, "--features", help="A TorchScript feature network (a local file) for 2.5D FID."),
    report: Optional[str] = typer.Option(None, "--report", help="Write the figures to this JSON file."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite the report if it exists."),
) -> None:
    """Compare generated volumes with real ones: HU distribution, lung profile, continuity, far-slice SSIM, nearest real slice, 2.5D FID."""
    from ctgridit.ct.evaluate import REASONS, read_folder
    from ctgridit.ct.evaluate import evaluate as run_evaluation
    from ctgridit.files import atomic_output, check_output_path, report_json

    if report:
        _require_suffix(report, ".json")
        check_output_path(report, force=force)
    if features is not None and not Path(features).is_file():
        raise CTGridItError("no such feature network file", features, "give a local TorchScript file")
    figures = run_evaluation(read_folder(real), read_folder(generated), features)
    for key, value in figures.items():
        typer.echo(f"{key:22}{value:>12.4f}" if isinstance(value, float) else f"{key:22}{value:>12}")
    if report:
        with atomic_output(report, force=force) as tmp:
            tmp.write_text(report_json(figures, REASONS))


@app.command(epilog="Example: ctgridit prepare pipelines/configs/ctrate_xl.yaml --workers 16")
def prepare(
    config: str = typer.Argument(..., metavar="CONFIG", help="A training config (YAML) that names data.cache."),
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Processes preparing volumes at once."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Prepare the config's training data once into its cache folder (resumable; training then reads it)."""
    from ctgridit.training.config import load_config
    from ctgridit.training.trainer import prepare as prepare_data

    from ctgridit.errors import shorten

    cfg = load_config(config)
    report = prepare_data(cfg, workers=workers, quiet=quiet)
    typer.echo(f"{report.done} sequences in {cfg.data.cache} ({report.prepared} prepared now)")
    if report.failed:
        which = "; ".join(f"{name} ({reason})" for name, reason in report.failed)
        raise CTGridItError(f"{len(report.failed)} of {report.done + len(report.failed)} volumes could not be "
                            f"prepared: {shorten(which, 400)}", cfg.data.cache,
                            "fix them or leave them out (data.hold_out) and run prepare again; the prepared ones "
                            "are kept")


train_app = typer.Typer(help="Train the grid model (stage 1) or the super-resolution model (stage 2).",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(train_app, name="train")

TRAIN_EPILOG = ("Example: ctgridit train {stage} --config pipelines/configs/ct_small.yaml\n\n"
                "Many GPUs: torchrun --nproc_per_node 4 -m ctgridit train {stage} --config CFG")


def _train(stage: int, config: str, resume: bool, steps: Optional[int], device: str, quiet: bool,
           audit: Optional[str], force: bool) -> None:
    from ctgridit.training.config import load_config
    from ctgridit.training.trainer import train

    if resume and force:
        raise CTGridItError("--resume continues a run and --force starts it over", config, "give one of them")
    result = train(load_config(config), stage, resume=resume, steps=steps, device=device, quiet=quiet,
                   audit_dir=audit, force=force)
    if result.first_loss is None:
        typer.echo(f"stage {stage}: already at the requested steps; exported the model folder {result.output}")
    else:
        typer.echo(f"stage {stage}: {result.steps} steps in {result.seconds:.0f} s, loss {result.first_loss:.4f} -> "
                   f"{result.last_loss:.4f}; model folder {result.output}")


def _train_options(stage: int):
    def command(
        config: str = typer.Option(..., "--config", "-c", help="A training config (YAML), see pipelines/configs/."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint of this stage."),
        steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Stop after this many optimizer steps in all (default the config's optim.steps; a cosine or linear learning rate still decays to 0 at optim.steps, so it may not exceed it)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (one GPU per process)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        force: bool = typer.Option(False, "--force", "-f", help="Start over where an earlier run left checkpoints (they are deleted)."),
        audit: Optional[str] = typer.Option(None, "--audit", hidden=True,
                                            help="Write per-process sample ids and weight digests here."),
    ) -> None:
        _train(stage, config, resume, steps, device, quiet, audit, force)

    command.__doc__ = ("Train stage 1: the unconditional grid DiT." if stage == 1 else
                       "Train stage 2: the per-frame super-resolution DiT.")
    return command


train_app.command("stage1", epilog=TRAIN_EPILOG.format(stage="stage1"))(_train_options(1))
train_app.command("stage2", epilog=TRAIN_EPILOG.format(stage="stage2"))(_train_options(2))


def _refuse_overwriting_input(src: str, outputs: list, *inputs) -> None:
    """No output may be one of the inputs: ``--force`` overwrites outputs, never what the user gave to read."""
    given = [Path(p) for p in (src, *inputs) if p]
    for out in (Path(o) for o in outputs if o):
        for path in given:
            same = out.exists() and path.exists() and os.path.samefile(out, path)
            if same or out.resolve() == path.resolve():
                raise CTGridItError("is an input of this command", out, "write the output to another file")


def _require_suffix(path: str, suffix: str) -> None:
    if not path.lower().endswith(suffix):
        raise CTGridItError(f"output must be a {suffix} file", path, f"use a name ending in {suffix}")


def _require_nifti_name(path: str) -> None:
    if not path.lower().endswith((".nii", ".nii.gz")):
        raise CTGridItError("output must be a NIfTI file", path, "use a name ending in .nii.gz or .nii")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Every warning as one ``warning:`` line: ctgridit's own as they are, a library's with its kind (and, with
    ``--debug``, where it came from)."""
    text = " ".join(str(message).split())
    if issubclass(category, CTGridItWarning):
        print(f"warning: {text}", file=sys.stderr)
    else:
        where = f" ({filename}:{lineno})" if debugging() else ""
        print(f"warning: {category.__name__}: {text}{where}", file=sys.stderr)


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed: numpy's MemoryError, or torch's allocator error."""
    return isinstance(err, MemoryError) or "can't allocate memory" in str(err) or "not enough memory" in str(err)


def usage_error(err: typer.TyperException) -> str:
    """A click usage error (bad option, missing argument) as one line naming the command and what to do."""
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "ctgridit"
    message = " ".join(err.format_message().split()).rstrip(".")
    return f"{command}: {message}; see {command} --help"


def _error_line(message: str, fresh_line: bool = False) -> None:
    """Print ``error: message`` as the last line: progress bars still open (a stop that came before the code that
    owns one could close it) are closed first, so none redraws itself below the error. ``fresh_line`` (a stop by a
    signal, which can arrive while a bar is half drawn) starts it on a new line."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # noqa: BLE001 - the error line matters more than a bar
        pass
    print(f"{chr(10) if fresh_line else ''}error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Run the command line: one ``error:`` line and exit 2 for user errors, 128 + signal when stopped.

    The console script enters through :mod:`ctgridit.entry`, which installs
    the signal handlers before the heavy imports.
    """
    from ctgridit import signals
    from ctgridit.signals import install_handlers, stop_of

    install_handlers()
    warnings.showwarning = _show_warning
    _debug["on"] = False                                       # set again by --debug, for this run only
    signals.received = None                                    # a stop of this run, not of an earlier one
    try:
        code = app(args=argv, prog_name="ctgridit", standalone_mode=False)
    except CTGridItError as err:
        if debugging():
            traceback.print_exception(err)
        _error_line(err.one_line())
        sys.exit(err.exit_code)
    except typer.TyperException as err:                       # bad options and arguments (click's errors)
        if type(err).__name__ == "NoArgsIsHelpError":          # `ctgridit` alone: the help
            print(err.format_message(), file=sys.stderr)
            sys.exit(2)
        _error_line(usage_error(err))
        sys.exit(2)
    except (MemoryError, RuntimeError) as err:                 # what an estimate missed: one line, not a traceback
        if not out_of_memory(err):
            raise
        if debugging():
            traceback.print_exception(err)
        _error_line("ran out of memory; ask for less (fewer slices or volumes, a smaller factor), crop the input, "
                    "or use a machine with more memory")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt) as err:
        stop = stop_of(err)
        _error_line(stop.reason, fresh_line=True)
        sys.exit(stop.exit_code)
    if signals.received is not None:                          # typer turned the interrupt into exit 130
        _error_line(signals.received.reason, fresh_line=True)
        sys.exit(signals.received.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
