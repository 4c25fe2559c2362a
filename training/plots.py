"""The paper's Fig. 3b from an evaluation result: reconstruction accuracy against interpolation
smoothness R(J) and against sample NLL, one point per model, the models of one kind (a beta
sweep of CLSMs, a gamma sweep of VAEs) joined as a curve. One PNG per data set, a row per
context case. Written by `python -m training.evaluate ... --plot DIR`."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # the object API needs no display backend

COLUMNS = (("R2", "R(2)"), ("R4", "R(4)"), ("R8", "R(8)"), ("lm_nll", "sample NLL (nats/token)"))
STYLE = {"clsm": ("tab:blue", "o"), "vae": ("tab:orange", "s")}


def plot_fig3b(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    cases = ("left", "other")
    for ds in result["reference"]:
        fig = Figure(figsize=(4 * len(COLUMNS), 3.4 * len(cases)))
        axes = fig.subplots(len(cases), len(COLUMNS), squeeze=False)
        for row, case in enumerate(cases):
            for col, (key, label) in enumerate(COLUMNS):
                ax = axes[row][col]
                for kind, (color, marker) in STYLE.items():
                    pts = sorted((r[key], r["recon_acc"], name)
                                 for name, e in result["models"].items() if e["kind"] == kind
                                 for r in [e["results"][ds][case]] if r.get(key) is not None)
                    if not pts:
                        continue
                    xs, ys, names = zip(*pts, strict=True)
                    ax.plot(xs, ys, color=color, marker=marker, label=kind.upper())
                    for x, y, name in pts:
                        ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3),
                                    textcoords="offset points")
                if key == "lm_nll" and result["reference"][ds][case].get("lm_nll") is not None:
                    ax.axvline(result["reference"][ds][case]["lm_nll"], color="grey", ls=":",
                               label="real data")
                ax.set_xlabel(label + (" (lower = smoother)" if key != "lm_nll" else ""))
                ax.set_ylabel("reconstruction accuracy")
                ax.set_title(f"{ds}, {case} context", fontsize=9)
                ax.grid(alpha=0.3)
                if row == 0 and col == 0:
                    ax.legend(fontsize=7)
        fig.suptitle(f"Fig. 3b as in the paper: {ds} test windows, argmax decoding", fontsize=10)
        fig.tight_layout()
        path = out / f"fig3b_{ds}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written
