"""Loss curves as PNG, drawn on the server with matplotlib: one run, or several overlaid (one colour each)."""

from __future__ import annotations

import io
import threading

from loralab.ui.scan import GENERATION_KEYS, RunView

_DRAWING = threading.Lock()  # matplotlib is not thread-safe; the server renders from a thread pool


def _panels(runs: list[RunView]) -> list[tuple[str, list[str]]]:
    panels = [("eval loss (step 0: base model)", ["eval_loss"]), ("train loss", ["loss"])]
    logged = [k for k in GENERATION_KEYS if any(run.series(f"eval_{k}")[0] for run in runs)]
    if logged:
        panels.append(("generation metrics on the eval split", [f"eval_{k}" for k in logged]))
    return panels


def curves_png(runs: list[RunView], title: str = "") -> bytes:
    """Eval loss, train loss (and generation metrics when logged) against the step.

    The base model's eval loss (step 0, logged before training) is marked; a run that failed or stopped is dotted.
    """
    from matplotlib.figure import Figure

    with _DRAWING:
        panels = _panels(runs)
        figure = Figure(figsize=(4.2 * len(panels), 3.9), dpi=100, layout="constrained")
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        colours = [f"C{i % 10}" for i in range(len(runs))]
        plotted = False
        for ax, (panel_title, keys) in zip(axes, panels):
            for run, colour in zip(runs, colours):
                style = ":" if run.status in ("failed", "diverged", "stopped") else "-"
                for key in keys:
                    steps, values = run.series(key)
                    if not steps:
                        continue
                    plotted = True
                    label = run.id if len(keys) == 1 else f"{run.id}: {key.removeprefix('eval_')}"
                    if len(runs) == 1 and len(keys) > 1:
                        colour = f"C{GENERATION_KEYS.index(key.removeprefix('eval_')) % 10}"
                    ax.plot(steps, values, style, color=colour, marker="o" if key != "loss" else None, markersize=3,
                            label=label if key != "loss" or len(runs) > 1 else None)
                    if key == "eval_loss" and steps[0] == 0:
                        ax.plot([0], [values[0]], marker="*", markersize=12, color=colour, linestyle="none")
                        if len(runs) == 1:
                            ax.annotate(f"base model {values[0]:.3g}", (0, values[0]), textcoords="offset points",
                                        xytext=(10, -4), fontsize="small")
            ax.set_title(panel_title, fontsize="medium")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0] and (len(runs) > 1 or len(keys) > 1):
                ax.legend(fontsize="x-small", loc="best")
        if not plotted:
            axes[0].text(0.5, 0.5, "no metrics logged yet", ha="center", va="center", transform=axes[0].transAxes)
        if title:
            figure.suptitle(title, fontsize="medium")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
