"""What ``ctgridit info`` reports about a volume: geometry and HU statistics."""

from __future__ import annotations

import numpy as np

from ctgridit.ct.volume import CTVolume

PERCENTILES = {"p1": 1.0, "p50": 50.0, "p99": 99.0}


def describe(volume: CTVolume) -> dict:
    """A JSON-ready summary: ``shape``, ``spacing``, ``orientation``, ``hu`` and provenance."""
    values = np.asarray(volume.array, dtype=np.float32).ravel()
    pct = np.percentile(values, list(PERCENTILES.values()))
    summary = {
        "path": volume.source,
        "shape": list(volume.shape),
        "spacing": [round(s, 6) for s in volume.spacing],
        "origin": [round(o, 4) for o in volume.origin_ras],
        "orientation": volume.orientation,
        "dtype": volume.source_dtype,
        "hu": {"min": float(values.min()), "max": float(values.max()),
               **{k: float(v) for k, v in zip(PERCENTILES, pct)}},
    }
    if volume.series_uid is not None:
        summary["series_uid"] = volume.series_uid
    if volume.notes:
        summary["notes"] = list(volume.notes)
    return summary


def format_summary(summary: dict) -> str:
    """The human-readable lines of :func:`describe`'s result."""
    hu = summary["hu"]
    x, y, z = summary["shape"]
    sx, sy, sz = summary["spacing"]
    lines = [
        f"file:         {summary['path']}",
        f"shape:        {x} x {y} x {z} voxels (x, y, z)",
        f"spacing:      {sx:.4g} x {sy:.4g} x {sz:.4g} mm",
        f"field:        {x * sx:.1f} x {y * sy:.1f} x {z * sz:.1f} mm",
        f"orientation:  {summary['orientation']} (nibabel axis codes; origin RAS {summary['origin']})",
        f"data type:    {summary['dtype']}",
        f"HU:           min {hu['min']:.0f}, p1 {hu['p1']:.0f}, p50 {hu['p50']:.0f}, p99 {hu['p99']:.0f}, max {hu['max']:.0f}",
    ]
    if "series_uid" in summary:
        lines.append(f"DICOM series: {summary['series_uid'] or '(no UID)'}")
    lines += [f"note:         {note}" for note in summary.get("notes", [])]
    return "\n".join(lines)
