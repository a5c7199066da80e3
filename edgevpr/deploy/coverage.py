"""A picture of a map's coverage (``edgevpr index info --plot``): where its images are, by session (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..utils import atomic_write
from .decision import EARTH_RADIUS_M


def coverage_plot(index, path: Path, max_points: int = 200_000) -> Path:
    """Every image's position (UTM metres, else local metres from lat/lon) as a dot coloured by session, on equal
    axes with a scale bar, so gaps and density show; images without coordinates are counted in the title. At most
    ``max_points`` dots (evenly spaced in database order). Needs matplotlib (the research install)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib, which this install lacks: pip install 'edgevpr[plot]'") from None
    c = index.coordinates()
    x, y = c.east.copy(), c.north.copy()
    geo = ~np.isfinite(x) & np.isfinite(c.lat)
    if geo.any():  # lat/lon only: metres east/north of the first such image (equirectangular)
        lat0, lon0 = c.lat[geo][0], c.lon[geo][0]
        x[geo] = np.radians(c.lon[geo] - lon0) * EARTH_RADIUS_M * np.cos(np.radians(lat0))
        y[geo] = np.radians(c.lat[geo] - lat0) * EARTH_RADIUS_M
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        raise ValueError(f"{index.root}: no image has coordinates: nothing to draw")
    sessions = index.sessions()
    names = np.empty(len(index), object)
    for s in sessions:  # the rows of one session need not be contiguous
        names[index.session_ids([s["session"]])] = s["session"]
    keep = np.nonzero(ok)[0][np.linspace(0, ok.sum() - 1, min(int(ok.sum()), max_points)).astype(int)]
    fig, ax = plt.subplots(figsize=(7, 7), dpi=120)
    cmap = plt.get_cmap("tab10" if len(sessions) <= 10 else "tab20")
    for k, s in enumerate(sessions):  # earlier sessions drawn larger, so visits of one route show as rings
        sel = keep[names[keep] == s["session"]]
        if len(sel):
            ax.scatter(x[sel] - x[ok].min(), y[sel] - y[ok].min(), s=max(4.0, 40.0 / (1 + k)), color=cmap(k % cmap.N),
                       label=f"{s['session']} ({s['images']} images)", zorder=2 + k)
    span = max(np.ptp(x[ok]), np.ptp(y[ok]), 1.0)
    cx, cy = np.ptp(x[ok]) / 2, np.ptp(y[ok]) / 2
    ax.set(xlim=(cx - 0.6 * span, cx + 0.6 * span), ylim=(cy - 0.6 * span, cy + 0.6 * span), xlabel="east (m)",
           ylabel="north (m)")
    ax.set_aspect("equal")
    bar = 10 ** np.floor(np.log10(span / 4))
    bar *= 5 if bar * 5 <= span / 4 else 2 if bar * 2 <= span / 4 else 1
    x0, y0 = cx - 0.5 * span, cy - 0.52 * span
    ax.plot([x0, x0 + bar], [y0, y0], color="k", lw=3)
    ax.annotate(f"{bar:g} m" if bar < 1000 else f"{bar / 1000:g} km", (x0 + bar / 2, y0), textcoords="offset points",
                xytext=(0, 4), ha="center", fontsize=8)
    missing = int((~ok).sum())
    ax.set_title(f"{index.root.name}: {len(index)} images, {len(sessions)} session(s)" +
                 (f", {missing} without coordinates" if missing else ""), fontsize=10)
    ax.legend(loc="best", fontsize=7, markerscale=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
