"""Which decoding puts the player-facing figures closest to real melodies (issue 10)?

    python -m training.evaluate --checkpoint CKPT --data cache/windows.npz --decoding D \
        --out runs/dec-D.json                        # once per candidate D
    python -m training.choose_decoding runs/dec-*.json

Per data set and context case, the distance of a model's generated targets to the real ones:
|onset rate / real - 1| + |hold share - real| + |rest share - real| + how far the pitch-class
fit falls short of the real data's (real melodies also leave the context's pitch classes
sometimes); the score is its mean over sets and cases (lower is closer). Decodings are ranked
by the number of the issue's player-facing targets they miss over all cells, then by score.
The targets: onset ratio 0.85-1.15, shares within 8 points, pc_fit >= 0.90,
re-rolls >= 6 of 8, interpolation >= 5 of 9, variation at delta 1.0 >= 15% in >= 90% of cases.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def distance(gen: dict, real: dict) -> float:
    return (abs(gen["onset_rate"] / real["onset_rate"] - 1) + abs(gen["hold_share"] - real["hold_share"])
            + abs(gen["rest_share"] - real["rest_share"]) + max(0.0, real["pc_fit"] - gen["pc_fit"]))


def targets_met(gen: dict, real: dict) -> dict[str, bool]:
    return {"onset": 0.85 <= gen["onset_rate"] / real["onset_rate"] <= 1.15,
            "shares": all(abs(gen[k] - real[k]) <= 0.08 for k in ("onset_rate", "hold_share", "rest_share")),
            "pc_fit": gen["pc_fit"] >= 0.90, "rerolls": gen["rerolls_distinct"] >= 6,
            "interp": gen["interp_distinct"] >= 5, "vary": gen["vary_ge15_1.0"] >= 0.90}


def compare(results: list[dict]) -> list[dict]:
    rows = []
    for result in results:
        for name, entry in result["models"].items():
            cells = []
            for ds, cases in entry["results"].items():
                for case, gen in cases.items():
                    real = result["reference"][ds][case]
                    cells.append((ds, case, distance(gen, real), targets_met(gen, real), gen, real))
            missed = sum(not ok for c in cells for ok in c[3].values())
            rows.append({"decoding": result["settings"]["decoding"], "model": name,
                         "score": sum(c[2] for c in cells) / len(cells), "missed": missed,
                         "cells": cells})
    return sorted(rows, key=lambda r: (r["missed"], r["score"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="training.evaluate --out files")
    args = p.parse_args(argv)
    rows = compare([json.loads(Path(f).read_text()) for f in args.results])
    for r in rows:
        print(f"{r['decoding']:28} {r['model']:16} targets missed {r['missed']:2}  score {r['score']:.3f}")
        for ds, case, d, met, gen, real in r["cells"]:
            ratio = gen["onset_rate"] / real["onset_rate"]
            missed = [k for k, ok in met.items() if not ok]
            print(f"    {ds:11} {case:5} d={d:.3f} onset x{ratio:.2f} hold {gen['hold_share']:.2f}"
                  f"/{real['hold_share']:.2f} rest {gen['rest_share']:.2f}/{real['rest_share']:.2f} "
                  f"pc_fit {gen['pc_fit']:.2f}/{real['pc_fit']:.2f} rolls {gen['rerolls_distinct']:.1f} "
                  f"interp {gen['interp_distinct']:.1f} vary>=15% {gen['vary_ge15_1.0']:.2f}"
                  f"  missed: {', '.join(missed) or 'none'}")
    print(f"fewest targets missed, then closest to real data: {rows[0]['decoding']}")


if __name__ == "__main__":
    main()
