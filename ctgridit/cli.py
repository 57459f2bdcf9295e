"""The ``ctgridit`` command line: thin wrappers over the Python API.

Every command parses its arguments, calls one library function and prints the
result. A :class:`~ctgridit.errors.CTGridItError` becomes one line on stderr,
``error: ...``, and exit code 2; warnings become ``warning: ...`` lines.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from ctgridit import __version__
from ctgridit.errors import CTGridItError, CTGridItWarning

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


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """GriDiT for CT: synthesise, denoise and inspect CT volumes with grid diffusion transformers."""


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
    force: bool = typer.Option(False, "--force", "-f", help="Write into OUT even if it already holds grid files."),
) -> None:
    """Write the grids the model sees (R x C slices per image, row-major) as PNG files."""
    from ctgridit.core.grid import GridSpec
    from ctgridit.ct.grid_images import write_grid_images
    from ctgridit.ct.io import read_ct
    from ctgridit.ct.window import parse_window

    spec = GridSpec(rows, cols, stride, factor)
    hu_window = parse_window(window)
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


@app.command(epilog="Example: ctgridit synth --slices 201 --out vol.nii.gz --seed 0 --preview vol.png")
def synth(
    slices: int = typer.Option(201, "--slices", min=1, help="Number of axial slices to generate."),
    out: str = typer.Option("vol.nii.gz", "--out", "-o", help="The NIfTI file to write."),
    num: int = typer.Option(1, "--num", min=1, help="How many volumes (written as OUT_000.nii.gz, ...)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same volume."),
    model: Optional[str] = typer.Option(None, "--model", help="A model folder saved by the trainer (default: the bundled model)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Denoising steps per grid (default: the model's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    preview_png: Optional[str] = typer.Option(None, "--preview", help="Also write a PNG of the three mid-planes."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Generate CT volumes of any number of slices with the grid diffusion model."""
    from ctgridit.ct.io import write_nifti
    from ctgridit.ct.preview import save_preview
    from ctgridit.files import check_output_path
    from ctgridit.progress import PhaseProgress
    from ctgridit.synthesis import load_model, synthesize

    outputs = numbered(out, num)
    previews = numbered(preview_png, num) if preview_png else []
    if preview_png:
        _require_suffix(preview_png, ".png")
    _require_nifti_name(out)
    for path in outputs + previews:                   # refuse before minutes of work
        check_output_path(path, force=force)
    pipeline = load_model(model, device)
    with PhaseProgress(enabled=not quiet) as progress:
        volumes = synthesize(slices, num, seed, pipeline, steps, progress=progress)
    for i, volume in enumerate(volumes):
        write_nifti(volume, outputs[i], force=force)
        if previews:
            save_preview(volume, previews[i], title=f"{Path(outputs[i]).name} (seed {seed})", force=force)
        if not quiet:
            typer.echo(f"wrote {outputs[i]} ({' x '.join(map(str, volume.shape))} voxels of "
                       f"{' x '.join(f'{s:g}' for s in volume.spacing)} mm)" + (f" and {previews[i]}" if previews else ""))


def numbered(path: str, count: int) -> list[str]:
    """``[path]`` for one output, else ``stem_000.ext, stem_001.ext, ...`` (``.nii.gz`` kept whole)."""
    if count == 1:
        return [path]
    p = Path(path)
    suffix = ".nii.gz" if p.name.lower().endswith(".nii.gz") else p.suffix
    stem = p.name[: len(p.name) - len(suffix)] if suffix else p.name
    return [str(p.with_name(f"{stem}_{i:03d}{suffix}")) for i in range(count)]


train_app = typer.Typer(help="Train the grid model (stage 1) or the super-resolution model (stage 2).",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(train_app, name="train")

TRAIN_EPILOG = ("Example: ctgridit train {stage} --config pipelines/configs/ct_small.yaml\n\n"
                "Many GPUs: torchrun --nproc_per_node 4 -m ctgridit train {stage} --config CFG")


def _train(stage: int, config: str, resume: bool, steps: Optional[int], device: str, quiet: bool,
           audit: Optional[str]) -> None:
    from ctgridit.training.config import load_config
    from ctgridit.training.trainer import train

    result = train(load_config(config), stage, resume=resume, steps=steps, device=device, quiet=quiet,
                   audit_dir=audit)
    if result.first_loss is None:
        typer.echo(f"stage {stage}: already at the requested steps; exported the model folder {result.output}")
    else:
        typer.echo(f"stage {stage}: {result.steps} steps in {result.seconds:.0f} s, loss {result.first_loss:.4f} -> "
                   f"{result.last_loss:.4f}; model folder {result.output}")


def _train_options(stage: int):
    def command(
        config: str = typer.Option(..., "--config", "-c", help="A training config (YAML), see pipelines/configs/."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint of this stage."),
        steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Total optimizer steps (overrides the config)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (one GPU per process)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        audit: Optional[str] = typer.Option(None, "--audit", hidden=True,
                                            help="Write per-process sample ids and weight digests here."),
    ) -> None:
        _train(stage, config, resume, steps, device, quiet, audit)

    command.__doc__ = ("Train stage 1: the unconditional grid DiT." if stage == 1 else
                       "Train stage 2: the per-frame super-resolution DiT.")
    return command


train_app.command("stage1", epilog=TRAIN_EPILOG.format(stage="stage1"))(_train_options(1))
train_app.command("stage2", epilog=TRAIN_EPILOG.format(stage="stage2"))(_train_options(2))


def _require_suffix(path: str, suffix: str) -> None:
    if not path.lower().endswith(suffix):
        raise CTGridItError(f"output must be a {suffix} file", path, f"use a name ending in {suffix}")


def _require_nifti_name(path: str) -> None:
    if not path.lower().endswith((".nii", ".nii.gz")):
        raise CTGridItError("output must be a NIfTI file", path, "use a name ending in .nii.gz or .nii")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, CTGridItWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ctgridit`` console script and ``python -m ctgridit``."""
    warnings.showwarning = _show_warning
    try:
        app(args=argv, prog_name="ctgridit")
    except CTGridItError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
