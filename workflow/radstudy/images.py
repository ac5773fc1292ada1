"""Images and masks: the one check that two images (or an image and a mask) share size, spacing, origin and
direction, and the default mask labels."""

from __future__ import annotations

import numpy as np

DEFAULT_LABELS = {"liver": 1, "tumour": 2}  # mask label values of the demo cohort and of the config template


def geometry(image) -> tuple:
    """(size, spacing, origin, direction) of a SimpleITK image or header reader (a tuple is returned as is)."""
    if isinstance(image, tuple):
        return image
    return tuple(image.GetSize()), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def grid_differences(a, b, tolerance: float = 1e-3, direction_tolerance: float | None = None) -> list[str]:
    """What differs between the grids of `a` and `b` (empty when they agree): the size exactly; spacing and
    origin (mm) within `tolerance`; direction cosines within `direction_tolerance` (default `tolerance`)."""
    (size_a, *rest_a), (size_b, *rest_b) = geometry(a), geometry(b)
    differences = []
    if tuple(size_a) != tuple(size_b):
        differences.append(f"size {tuple(size_a)} vs image {tuple(size_b)}")
    for name, ours, theirs in zip(("spacing", "origin", "direction"), rest_a, rest_b):
        tol = tolerance if name != "direction" or direction_tolerance is None else direction_tolerance
        if len(ours) != len(theirs) or np.max(np.abs(np.subtract(ours, theirs))) > tol:
            differences.append(f"{name} {_fmt_values(ours)} vs image {_fmt_values(theirs)}")
    return differences


def same_grid(a, b, tolerance: float = 1e-3, direction_tolerance: float | None = None) -> bool:
    """True when `a` and `b` (images, header readers or `geometry` tuples) share their grid (see grid_differences)."""
    return not grid_differences(a, b, tolerance, direction_tolerance)


def _fmt_values(values) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def largest_slice(region: np.ndarray) -> int:
    """Axial slice (axis 0) with the most region voxels (the first of equals)."""
    return int(np.argmax(region.reshape(region.shape[0], -1).sum(1)))
