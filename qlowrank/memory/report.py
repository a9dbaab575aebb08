"""Memory reports shared by the profiler and the estimator: byte formatting, tables, JSON, PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from ..atomic import staged_file
from .tracker import CATEGORIES, PHASES

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
COLORS = {  # one colour per category, the same in every plot
    "base_weights": "#4c72b0", "trainable_params": "#55a868", "gradients": "#c44e52",
    "optimizer_states": "#8172b2", "activations": "#ccb974", "temporaries": "#64b5cd",
}


def format_bytes(nbytes: float) -> str:
    """1536 -> '1.50 KiB' (binary units, as GPU memory is sold and reported)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_bytes(text: str | int | float) -> int:
    """'24GiB', '24 GB', '80e9' or a number -> bytes.

    Raises:
        ValueError: the text is not a number with an optional unit (B, KB, MB, GB, TB, KiB ... TiB).
    """
    if isinstance(text, (int, float)):
        return int(text)
    cleaned = str(text).strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number):] or "b"
    if unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 24GiB, 24GB or 25769803776")
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 24GiB, 24GB or 25769803776") from None


def breakdown_table(breakdown: Mapping[str, int], title: str, extra: Sequence[tuple[str, str]] = ()) -> str:
    """A fixed-width text table: one row per category with bytes and share, then a total."""
    total = sum(breakdown.values()) or 1
    lines = [title, f"{'category':<18}{'bytes':>14}{'share':>9}", "-" * 41]
    for name in list(CATEGORIES) + [k for k in breakdown if k not in CATEGORIES]:
        value = breakdown.get(name, 0)
        lines.append(f"{name:<18}{format_bytes(value):>14}{100 * value / total:>8.1f}%")
    lines.append("-" * 41)
    lines.append(f"{'total':<18}{format_bytes(sum(breakdown.values())):>14}")
    lines.extend(f"{key:<18}{value:>14}" for key, value in extra)
    return "\n".join(lines)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through `atomic.staged_file`: a staging name, fsynced, renamed into place."""
    path = Path(path)
    with staged_file(path, what=path.name) as tmp:
        tmp.write_text(text)
    return path


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG the same way (`atomic.staged_file`)."""
    path = Path(path)
    with staged_file(path, what=path.name) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_profile(timeline: Sequence[tuple[int, int, int, tuple[int, ...]]], peak: Mapping[str, int],
                 path: str | os.PathLike, title: str = "qlowrank memory profile") -> Path:
    """PNG: the timeline as stacked areas with phases shaded, and a bar of the peak breakdown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_peak) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1]})
    mib = 2**20
    timeline = _keep_peaks(list(timeline))
    if timeline:
        xs = [sample[0] for sample in timeline]
        series = [[sample[3][i] / mib for sample in timeline] for i in range(len(CATEGORIES))]
        ax_time.stackplot(xs, series, labels=CATEGORIES, colors=[COLORS[c] for c in CATEGORIES], alpha=0.9)
        # filled areas drop one-event spikes at this scale; the total as a line keeps them
        totals = [sum(column) for column in zip(*series)]
        ax_time.plot(xs, totals, color="black", lw=0.6, label="total")
        top = max(range(len(totals)), key=totals.__getitem__)
        ax_time.annotate(f"peak {totals[top]:.0f} MiB", (xs[top], totals[top]), xytext=(10, -12),
                         textcoords="offset points", fontsize=8, arrowprops={"arrowstyle": "->", "lw": 0.6})
        _shade_phases(ax_time, timeline)
    ax_time.set_xlabel("allocation / free event (forward, backward, optimizer shaded)")
    ax_time.set_ylabel("live tensor memory (MiB)")
    ax_time.set_title(title)
    ax_time.legend(loc="upper left", fontsize=8)
    bottom = 0.0
    for name in CATEGORIES:
        value = peak.get(name, 0) / mib
        ax_peak.bar(["at peak"], [value], bottom=bottom, color=COLORS[name], label=name)
        if value > 0.03 * (sum(peak.values()) / mib or 1):
            ax_peak.text(0, bottom + value / 2, f"{name}\n{value:.1f} MiB", ha="center", va="center", fontsize=8)
        bottom += value
    ax_peak.set_title(f"peak: {format_bytes(sum(peak.values()))}")
    ax_peak.set_ylabel("MiB")
    saved = save_figure(fig, path)
    plt.close(fig)
    return saved


def _keep_peaks(timeline: list, buckets: int = 1500) -> list:
    # A plot cannot show 60,000 events; keep each bucket's highest sample so spikes
    # (the logits at the start of backward) stay visible.
    if len(timeline) <= buckets:
        return timeline
    size = -(-len(timeline) // buckets)
    return [max(timeline[i:i + size], key=lambda sample: sum(sample[3])) for i in range(0, len(timeline), size)]


def _shade_phases(ax, timeline) -> None:
    shades = {"forward": "#e8f0ff", "backward": "#ffeaea", "optimizer": "#eaffea"}
    start = 0
    for i in range(1, len(timeline) + 1):
        if i == len(timeline) or timeline[i][1] != timeline[start][1]:
            phase = PHASES[timeline[start][1]]
            if phase in shades:
                x0, x1 = timeline[start][0], timeline[i - 1][0]
                ax.axvspan(x0, x1, color=shades[phase], zorder=0)
                ax.text((x0 + x1) / 2, ax.get_ylim()[1] * 0.97, phase[0].upper(), ha="center", va="top", fontsize=7)
            start = i
