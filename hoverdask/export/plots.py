"""The report's matplotlib figures (Agg backend, PNG bytes): a slide's overview with its
nucleus-density heat map, its type mix and feature histograms, and the cohort's densities.

Each function returns PNG bytes and closes its figure, so a long cohort never accumulates
figures. Colours are the type table's, as in the QuPath file and the QC picture.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RGB = tuple[int, int, int]
DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display: never open a window
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=DPI)
    finally:
        plt.close(figure)
    return buffer.getvalue()


def _rgb(color: RGB) -> tuple[float, float, float]:
    return (color[0] / 255, color[1] / 255, color[2] / 255)


def overview_png(
    thumbnail: np.ndarray | None,
    density: np.ndarray,
    extent_um: tuple[float, float, float, float],
    grid_um: tuple[float, float, float, float],
    boxes: Sequence[tuple[str, tuple[float, float, float, float]]] = (),
) -> bytes:
    """Two panels over the same extent (µm, ``(x0, y0, x1, y1)``): the tissue with the crop
    boxes (``(label, (x0, y0, x1, y1))``), and the density (nuclei/mm², NaN where no tissue;
    its cells cover ``grid_um``) over a grey copy of it."""
    plt = _pyplot()
    x0, y0, x1, y1 = (v / 1000 for v in extent_um)  # mm on the axes
    aspect = (y1 - y0) / max(x1 - x0, 1e-9)
    width = 9.0
    height = min(7.0, max(2.6, width / 2 * aspect + 0.8))
    figure, (left, right) = plt.subplots(1, 2, figsize=(width, height), layout="constrained")
    extent = (x0, x1, y1, y0)
    if thumbnail is not None:
        left.imshow(thumbnail, extent=extent, interpolation="antialiased")
        grey = thumbnail[..., :3].mean(axis=2)
        right.imshow(grey, extent=extent, cmap="gray", vmin=0, vmax=255, alpha=0.6)
    else:
        left.text(0.5, 0.5, "slide pixels not available", ha="center", va="center",
                  transform=left.transAxes)  # fmt: skip
    shown = np.ma.masked_invalid(density)
    gx0, gy0, gx1, gy1 = (v / 1000 for v in grid_um)
    image = right.imshow(shown, extent=(gx0, gx1, gy1, gy0), cmap="inferno", alpha=0.75,
                         interpolation="nearest", vmin=0)  # fmt: skip
    figure.colorbar(image, ax=right, label="nuclei / mm²", shrink=0.85)
    for label, (bx0, by0, bx1, by1) in boxes:
        for axis, color in ((left, "#00e5ff"), (right, "#00e5ff")):
            axis.add_patch(plt.Rectangle((bx0 / 1000, by0 / 1000), (bx1 - bx0) / 1000,
                                         (by1 - by0) / 1000, fill=False, lw=1.5, ec=color))  # fmt: skip
            axis.annotate(label, (bx0 / 1000, by0 / 1000), color=color, fontsize=8,
                          xytext=(0, 2), textcoords="offset points", va="bottom")  # fmt: skip
    for axis, title in ((left, "tissue, crops marked"), (right, "nucleus density")):
        axis.set_xlim(x0, x1)
        axis.set_ylim(y1, y0)
        axis.set_xlabel("mm")
        axis.set_title(title, fontsize=10)
        axis.tick_params(labelsize=7)
    return _png(figure)


def slide_plots_png(
    types: Sequence[tuple[str, RGB, int]],
    areas: Mapping[str, np.ndarray],
    circularities: Mapping[str, np.ndarray],
) -> bytes:
    """Type mix (nuclei per type), and area (µm²) and circularity histograms per type.

    ``types``: ``(name, colour, count)`` in table order; ``areas``/``circularities``: values per
    type name (NaN allowed)."""
    plt = _pyplot()
    figure, (mix, area, circ) = plt.subplots(1, 3, figsize=(11, 2.9), layout="constrained")
    names = [name for name, _, _ in types]
    counts = np.array([n for _, _, n in types], float)
    colors = [_rgb(c) for _, c, _ in types]
    total = counts.sum()
    mix.barh(range(len(types)), counts, color=colors, edgecolor="#333", linewidth=0.5)
    mix.set_yticks(range(len(types)), names, fontsize=8)
    mix.invert_yaxis()
    for k, n in enumerate(counts):
        share = f"{100 * n / total:.0f}%" if total else ""
        mix.annotate(f" {int(n):,} {share}", (n, k), va="center", fontsize=7)
    mix.set_xlim(0, max(1.0, counts.max(initial=0) * 1.35))
    mix.set_title("type mix (nuclei)", fontsize=10)
    _histograms(area, areas, dict(zip(names, colors, strict=True)), "area (µm²)", None)
    _histograms(circ, circularities, dict(zip(names, colors, strict=True)), "circularity",
                (0.0, 1.0))  # fmt: skip
    for axis in (mix, area, circ):
        axis.tick_params(labelsize=7)
    return _png(figure)


def _histograms(axis: Any, values: Mapping[str, np.ndarray], colors: Mapping[str, Any],
                label: str, limits: tuple[float, float] | None) -> None:
    finite = {k: v[np.isfinite(v)] for k, v in values.items()}
    everything = np.concatenate(list(finite.values()) or [np.zeros(0)])
    if everything.size == 0:
        axis.text(0.5, 0.5, "no nuclei", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(label, fontsize=10)
        return
    if limits is None:
        limits = (0.0, float(np.percentile(everything, 99.5)) or 1.0)
    bins = np.linspace(limits[0], limits[1], 41)
    axis.hist(np.clip(everything, *limits), bins=bins, color="#bbb", label="all")
    for name, data in finite.items():
        if data.size:
            axis.hist(np.clip(data, *limits), bins=bins, histtype="step", linewidth=1.4,
                      color=colors.get(name, "k"), label=name)  # fmt: skip
    axis.set_xlabel(label, fontsize=8)
    axis.set_ylabel("nuclei", fontsize=8)
    axis.set_title(f"{label}: median {np.median(everything):.3g}", fontsize=10)


def cohort_densities_png(
    slides: Sequence[str],
    types: Sequence[tuple[str, RGB]],
    densities: np.ndarray,
    flagged: Sequence[bool] = (),
) -> bytes:
    """Nuclei per mm² of tissue, per slide (rows of ``densities``) and type (columns), bars side
    by side per slide (stacked when the cohort is long); flagged slides' names in red."""
    plt = _pyplot()
    n_slides, n_types = densities.shape
    grouped = n_slides <= 12
    width = min(16.0, max(6.0, 0.35 * n_slides * (n_types if grouped else 1) + 2))
    figure, axis = plt.subplots(figsize=(width, 3.4), layout="constrained")
    positions = np.arange(n_slides)
    bottom = np.zeros(n_slides)
    bar = 0.8 / max(1, n_types) if grouped else 0.8
    for k, (name, color) in enumerate(types):
        values = np.nan_to_num(densities[:, k])
        if grouped:
            axis.bar(positions - 0.4 + bar * (k + 0.5), values, bar, color=_rgb(color),
                     edgecolor="#333", linewidth=0.4, label=name)  # fmt: skip
        else:
            axis.bar(positions, values, bar, bottom=bottom, color=_rgb(color),
                     edgecolor="#333", linewidth=0.3, label=name)  # fmt: skip
            bottom += values
    axis.set_xticks(positions, slides, rotation=30 if n_slides > 3 else 0, ha="right"
                    if n_slides > 3 else "center", fontsize=8)  # fmt: skip
    for tick, flag in zip(axis.get_xticklabels(), flagged, strict=False):
        if flag:
            tick.set_color("#c00")
    axis.set_ylabel("nuclei / mm² of tissue", fontsize=8)
    axis.legend(fontsize=7, ncols=min(n_types, 6), loc="upper left", bbox_to_anchor=(0, 1.18),
                frameon=False)  # fmt: skip
    axis.tick_params(labelsize=7)
    return _png(figure)
