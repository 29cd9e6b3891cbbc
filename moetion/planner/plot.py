"""ETTR versus MTBF for every approach (matplotlib is an optional extra: ``pip install moetion[plots]``)."""
from __future__ import annotations

from pathlib import Path

from moetion.errors import ConfigError
from moetion.planner.cost import HardwareSpec, ModelSpec, plan_approaches
from moetion.planner.ettr import analytic_ettr

DEFAULT_MTBFS_S = (300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)


def ettr_curves(model: ModelSpec, hardware: HardwareSpec, *,
                mtbfs_s: tuple[float, ...] = DEFAULT_MTBFS_S) -> dict[str, list[float]]:
    """Analytic ETTR per approach at each MTBF (the interval is re-optimised for each MTBF)."""
    curves: dict[str, list[float]] = {}
    for mtbf in mtbfs_s:
        for name, cost in plan_approaches(model, hardware, mtbf_s=mtbf).items():
            curves.setdefault(name, []).append(analytic_ettr(cost, mtbf_s=mtbf))
    return curves


def plot_ettr(model: ModelSpec, hardware: HardwareSpec, out: str | Path, *,
              mtbfs_s: tuple[float, ...] = DEFAULT_MTBFS_S, marker_mtbf_s: float | None = None) -> Path:
    """Writes the PNG; raises ConfigError with install advice when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib (or pip install 'moetion[plots]')") from None
    curves = ettr_curves(model, hardware, mtbfs_s=mtbfs_s)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    minutes = [m / 60 for m in mtbfs_s]
    for name, values in curves.items():
        ax.plot(minutes, values, marker="o", label=name + (" (time only; loses tokens)" if name == "moc" else ""))
    if marker_mtbf_s:
        ax.axvline(marker_mtbf_s / 60, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("MTBF (minutes)")
    ax.set_ylabel("ETTR (analytic)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{model.name}: ETTR vs MTBF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
