"""Model folders: where the bundled ones live, and opening one (bundled or ``--model DIR``) with its checks.

``synth`` (CT and video) and ``denoise`` open their models here, so a missing
bundled model, a model of the wrong adapter or a bad ``--device`` reads the
same for all.
"""

from __future__ import annotations

import os
from pathlib import Path

from ctgridit.adapters import get_adapter
from ctgridit.core.loading import is_model_folder, read_settings
from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.device import resolve_device
from ctgridit.errors import CTGridItError

MODELS = Path(__file__).resolve().parent / "models"
#: The demonstration synthesis model shipped inside the package (see its MODEL.md).
BUNDLED_MODEL = MODELS / "ct_chest"
#: The native-resolution denoiser shipped inside the package (see its MODEL.md).
BUNDLED_DENOISER = MODELS / "ct_denoise"
#: The native-resolution model of ``interpolate`` and ``extend`` shipped inside the package (see its MODEL.md).
BUNDLED_SLICE_MODEL = MODELS / "ct_interpolate"
#: The moving-squares video model shipped inside the package (see its MODEL.md): the video test fine-tunes it.
BUNDLED_VIDEO_MODEL = MODELS / "video_shapes"
#: An environment variable that points at another default synthesis model folder.
MODEL_ENV = "CTGRIDIT_MODEL"


def default_model_dir() -> Path:
    """``$CTGRIDIT_MODEL`` if set (a folder or a bundled model's name, :func:`model_folder`), else the bundled
    synthesis model."""
    return model_folder(os.environ[MODEL_ENV]) if os.environ.get(MODEL_ENV) else BUNDLED_MODEL


def model_folder(model: str | os.PathLike | None, default: Path = BUNDLED_MODEL) -> Path:
    """The folder ``model`` names: ``default`` for ``None``; the bundled model of that name for a name such as
    ``video_shapes`` that is no path here; else the path itself."""
    if model is None:
        return default
    if not Path(model).exists() and is_model_folder(MODELS / str(model)):
        return MODELS / str(model)
    return Path(model)


def model_kind(model: str | os.PathLike) -> str:
    """The adapter a model folder (or bundled model name) writes its output with (``settings.adapter.kind``:
    ``"ct"``, ``"video"`` or a registered one, :mod:`ctgridit.adapters`), read without loading weights."""
    folder = model_folder(model)
    kind = read_settings(folder).adapter.get("kind")
    if not isinstance(kind, str):
        raise CTGridItError("the model folder does not record its adapter (settings.adapter.kind in "
                            "model_index.json)", folder, "export it again with ctgridit train")
    return kind


def is_native(pipeline: GriDiTPipeline) -> bool:
    """Whether the model works on tiles at the scan's own voxel size (the denoiser, the slice model)."""
    return pipeline.settings.adapter.get("resolution") == "native"


def open_model(model: str | os.PathLike | None, default: Path, purpose: str, device: str = "auto",
               kind: str = "ct") -> GriDiTPipeline:
    """The model folder ``model`` (:func:`model_folder`; ``None``: ``default``, a bundled one) on ``device``.

    Refused with one line: a bad device (before any loading), a missing bundled
    model, a folder that is not a model, a model of another adapter than ``kind``.
    ``purpose`` names the task in the messages ("synthesis", "denoising").
    """
    where = resolve_device(device)
    folder = model_folder(model, default)
    if model is None and not is_model_folder(folder):
        raise CTGridItError(f"no {purpose} model is installed", folder,
                            "reinstall ctgridit (it ships one) or pass --model DIR with a trained model folder")
    found = model_kind(folder)
    if found != kind:
        wanted, have = get_adapter(kind), get_adapter(found, str(folder))
        raise CTGridItError(f"is a {have.title or have.name} model, not a {wanted.title or wanted.name} model", folder,
                            f"give a model trained on {wanted.trained_on or wanted.name + ' data'}")
    return GriDiTPipeline.from_pretrained(folder).to(where)
