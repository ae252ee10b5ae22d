"""Report plots as PNG bytes (matplotlib, Agg): cost against success (Pareto view), cost-per-task spread."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names on the cost/success Pareto front: no other point is cheaper-or-equal and at least as good."""
    front = []
    for n, (c, s) in points.items():
        dominated = any(
            (c2 <= c and s2 >= s) and (c2 < c or s2 > s) for m, (c2, s2) in points.items() if m != n
        )
        if not dominated:
            front.append(n)
    return sorted(front, key=lambda n: points[n][0])


def cost_vs_success(results: dict) -> bytes:
    pts = {
        s: (st["usd_per_task"] or 0.0, (st["success_rate"] or 0.0) * 100)
        for s, st in results["stats"].items()
    }
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, (c, s)) in enumerate(pts.items()):
        ax.scatter([c], [s], s=60)
        # staggered so that strategies with close costs keep readable labels
        ax.annotate(name, (c, s), textcoords="offset points", xytext=(6, 4 + 11 * (i % 3)))
    front = pareto(pts)
    if len(front) > 1:
        ax.plot(
            [pts[n][0] for n in front], [pts[n][1] for n in front], "--", color="grey", label="Pareto front"
        )
        ax.legend(loc="lower right")
    ax.set_xlabel("USD per task")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(-5, 105)
    ax.set_title("cost against success")
    ax.grid(alpha=0.3)
    return _png(fig)


def cost_distribution(results: dict) -> bytes:
    names = results["strategies"]
    data = [results["cost_per_task"][s] or [0.0] for s in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel("USD per task")
    ax.set_title("cost per task")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)
