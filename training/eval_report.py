"""Saved evaluation results (training/evaluate.py --out): merging several into one table and
printing them as text or Markdown (`python -m training.evaluate --from FILE.json --markdown`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

CASES = ("left", "other")  # context cases: left context only / a right context too


# Settings that make two results' figures comparable (the same windows, draws and decoding).
SAME_SETTINGS = ("data", "split", "n_per_set", "batch", "seed", "decoding")


def merge_results(results: list[dict]) -> dict:
    """One result with the models of several saved ones: a model already there with the same
    figures (a baseline evaluated beside each checkpoint, maybe by an older version with fewer
    figures) is kept once, another of the same name is renamed. Results whose settings differ
    in SAME_SETTINGS are refused."""
    merged = {**results[0], "models": dict(results[0]["models"]),
              "settings": dict(results[0]["settings"])}
    for other in results[1:]:
        differ = [k for k in SAME_SETTINGS if other["settings"].get(k) != merged["settings"].get(k)]
        if differ:
            raise ValueError("results with different settings cannot share a table: "
                             + ", ".join(f"{k} {merged['settings'].get(k)!r} vs "
                                         f"{other['settings'].get(k)!r}" for k in differ))
        for name, entry in other["models"].items():
            if name in merged["models"] and same_figures(merged["models"][name]["results"],
                                                         entry["results"]):
                continue
            merged["models"][unique_name(name, merged["models"])] = entry
        for key in ("checkpoints", "baselines"):  # where every row came from
            merged["settings"][key] = [*merged["settings"].get(key, []),
                                       *other["settings"].get(key, [])]
    return merged


def same_figures(a: dict, b: dict) -> bool:
    """Two models' results ({data set: {case: {figure: value}}}) agree on every figure both
    have, up to float rounding (the LM's sums differ in the 8th digit between runs): a result
    saved by a later version of training.evaluate may have more figures."""
    if a.keys() != b.keys() or any(a[ds].keys() != b[ds].keys() for ds in a):
        return False
    return all(same_figure(a[ds][case][k], b[ds][case][k])
               for ds in a for case in a[ds] for k in a[ds][case].keys() & b[ds][case].keys())


def same_figure(x: float | None, y: float | None) -> bool:
    if x is None or y is None:
        return x is y
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def load_saved(path: str) -> dict:
    """A result saved by --out; anything else is refused with the file's name."""
    try:
        result = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(result, dict) or not {"settings", "reference", "models"} <= result.keys():
        raise ValueError(f"{path}: not a saved evaluation (no settings, reference and models)")
    return result


def unique_name(name: str, taken: dict) -> str:
    k, out = 2, name
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    return out


TABLE = [("acc", "recon_acc"), ("prior_acc", "prior_sample_acc"), ("R2", "R2"), ("R4", "R4"),
         ("R8", "R8"), ("nll", "lm_nll"), ("onset", "onset_rate"), ("hold", "hold_share"),
         ("rest", "rest_share"), ("pc_fit", "pc_fit"), ("pc_ovl", "pc_overlap"),
         ("rolls/8", "rerolls_distinct"), ("interp/9", "interp_distinct"),
         ("var1.0", "vary_change_1.0"), ("var>=15%", "vary_ge15_1.0"),
         ("roll>=15%", "rerolls_ge15")]


def format_table(result: dict) -> str:
    """One block per data set and case: the real data, then every model."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    width = max([16, *(len(n) + 2 for n in result["models"])])
    lines = [f"decoding for the player figures: {result['settings']['decoding']}"]
    for ds, cases in result["reference"].items():
        for case in CASES:
            lines += ["", f"{ds}, {case} context (n={result['settings']['n_per_set']})",
                      "model".ljust(width) + "".join(h.rjust(10) for h, _ in TABLE)]
            rows = [("real data", cases[case])]
            rows += [(name, e["results"][ds][case]) for name, e in result["models"].items()]
            lines += [name.ljust(width) + "".join(fmt(r.get(k)).rjust(10) for _, k in TABLE)
                      for name, r in rows]
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The same tables as format_table, as Markdown (for model cards)."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = []
    for ds, cases in result["reference"].items():
        for case in CASES:
            lines += ["", f"**{ds}, {case} context** (n = {result['settings']['n_per_set']}; "
                      f"player figures: {result['settings']['decoding']})", "",
                      "| model | " + " | ".join(h for h, _ in TABLE) + " |",
                      "|---" * (len(TABLE) + 1) + "|"]
            rows = [("real data", cases[case])]
            rows += [(name, e["results"][ds][case]) for name, e in result["models"].items()]
            lines += ["| " + name + " | " + " | ".join(fmt(r.get(k)) for _, k in TABLE) + " |"
                      for name, r in rows]
    return "\n".join(lines[1:])
