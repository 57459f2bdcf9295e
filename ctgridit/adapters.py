"""Adapters: what a kind of data (CT scans, CT-RATE, videos, the next one) tells the generic parts of ctgridit.

The core (:mod:`ctgridit.core`) and the trainer (:mod:`ctgridit.training`)
work on frame sequences ``(N, C, H, W)`` in ``[-1, 1]`` and know no file format.
An :class:`Adapter` is everything they need from one kind of data:

- :meth:`~Adapter.check_data`: refuse, before any work, a data section that
  cannot work for this kind;
- :meth:`~Adapter.training_sequences`: the training data as sequences (a list,
  or a lazy loader: :class:`~ctgridit.training.datasets.FrameSequences`);
- :meth:`~Adapter.prepare_sequences`: the same as a lazy loader with
  ``name(i)`` and ``load(i)``, which ``ctgridit prepare`` caches (for data whose
  reading costs more than a training step: CT);
- :meth:`~Adapter.model_settings`: what a model folder records about its data
  (``settings.adapter`` in ``model_index.json``, with ``kind``: the adapter
  that turns the model's frames into output);
- :meth:`~Adapter.to_output`: a generated sequence in the user's format
  (a CT volume in HU, uint8 video frames).

Adapters are found by name through one registry (:func:`get_adapter`): the
name is ``data.kind`` in a training config and ``settings.adapter.kind`` in a
model folder. The built-in ones are imported only when asked for, so nothing
here (nor the trainer) imports an adapter; :func:`register_adapter` adds one
without editing any file of ctgridit.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from ctgridit.errors import CTGridItError

#: A training config (:class:`~ctgridit.training.config.TrainConfig`): the interface does not import the trainer,
#: which imports this registry.
TrainConfig = Any


class Adapter:
    """One kind of data behind the interface of the module docstring. Subclasses set :attr:`name`."""

    #: The adapter's name: ``data.kind`` in configs, ``settings.adapter.kind`` in model folders.
    name: ClassVar[str] = ""
    #: How messages name its models ("a CT model") and their training data ("trained on CT volumes").
    title: ClassVar[str] = ""
    trained_on: ClassVar[str] = ""

    def check_data(self, config: TrainConfig) -> None:
        """Raise :class:`~ctgridit.errors.CTGridItError` (naming ``config.source``) when the data section
        cannot work for this kind of data. Nothing is read."""

    def training_sequences(self, config: TrainConfig):
        """The configured training data as a lazy loader of ``(N, C, H, W)`` sequences in [-1, 1]."""
        raise NotImplementedError

    def prepare_sequences(self, config: TrainConfig):
        """The training data as a lazy loader with ``name(i)`` (what sequence ``i`` is) and ``load(i)``
        (``(frames, own slice spacing or None)``), for ``ctgridit prepare``; not every kind of data has one."""
        raise CTGridItError(f"prepare caches data that is costly to read; data of kind {self.name!r} is read "
                            "directly", config.source, "train without data.cache")

    def model_settings(self, config: TrainConfig) -> dict[str, Any]:
        """What the model folder records about the data (``settings.adapter``); ``kind`` names the adapter whose
        :meth:`to_output` the model's frames go through (this one's :attr:`name` unless it writes another's)."""
        return {"kind": self.name}

    def to_output(self, frames, settings: dict[str, Any], source: str | None = None) -> Any:
        """A generated ``(N, C, H, W)`` sequence in [-1, 1] in the user's format, with what ``settings`` (the
        model folder's ``settings.adapter``) records; ``source`` says where it came from."""
        raise NotImplementedError


#: The registered adapters: a name -> the class, or ``"module:Class"`` to import when first asked for.
_REGISTRY: dict[str, type[Adapter] | str] = {
    "ct": "ctgridit.ct.adapter:CTAdapter",
    "ctrate": "ctgridit.ct.adapter:CTRateAdapter",
    "video": "ctgridit.video.adapter:VideoAdapter",
}


def register_adapter(adapter: type[Adapter], name: str | None = None) -> type[Adapter]:
    """Make ``adapter`` (a subclass of :class:`Adapter`) known under ``name`` (default its :attr:`~Adapter.name`);
    usable as a class decorator. A name already taken by another adapter is a ValueError."""
    if not (isinstance(adapter, type) and issubclass(adapter, Adapter)):
        raise ValueError(f"an adapter must be a subclass of ctgridit.adapters.Adapter, got {adapter!r}")
    name = name or adapter.name
    if not name:
        raise ValueError("an adapter needs a name (its class attribute name, or the name argument)")
    known = _REGISTRY.get(name)
    if known is not None and known is not adapter and _resolve(name) is not adapter:
        raise ValueError(f"the adapter name {name!r} is taken")
    _REGISTRY[name] = adapter
    return adapter


def adapter_names() -> list[str]:
    """The names of the registered adapters, sorted."""
    return sorted(_REGISTRY)


def get_adapter(name: str, source: str | None = None) -> Adapter:
    """The adapter registered as ``name``; an unknown name is one clear error (naming ``source``, e.g. the config
    or model folder that asked for it)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise CTGridItError(f"unknown data kind {name!r} (the adapters are {', '.join(adapter_names())})", source,
                            "fix data.kind, or register the adapter with ctgridit.adapters.register_adapter")
    return _resolve(name)()


def _resolve(name: str) -> type[Adapter]:
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        _REGISTRY[name] = target
    return target
