"""Position-wise conditional acceptance per drafter, from a recorded eval summary of the former
``scripts/drafters_device.sh eval`` (lines ``== ... eval SET T=t`` then
``METHOD tau X accept Y% per-pos p1 .. pg | ...``).

    python bench/plot_acceptance.py bench/results/2026-11-29/drafters_eval.txt out.png

New runs: `dspark bench --out DIR` draws acceptance_by_position.png itself.
"""
import re
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HEADER = re.compile(r"^== \S+ eval (\S+) T=(\S+)")
ROW = re.compile(r"^(\S+)\s+tau ([\d.]+) accept [\d.]+% per-pos ([\d. ]+)\|")


def parse(path: str) -> dict:
    """{(set, T): {method: (tau, [conditional acceptance per position])}}"""
    runs, key = defaultdict(dict), None
    for line in open(path):
        if m := HEADER.match(line):
            key = (m[1], m[2])
        elif (m := ROW.match(line)) and key is not None:
            runs[key][m[1]] = (float(m[2]), [float(x) for x in m[3].split()])
    return runs


def main(src: str, dst: str) -> None:
    runs = parse(src)
    sets = list(dict.fromkeys(s for s, _ in runs))
    temps = sorted({t for _, t in runs})
    fig, axes = plt.subplots(len(temps), len(sets), figsize=(3.2 * len(sets), 2.8 * len(temps)),
                             sharex=True, sharey=True, squeeze=False)
    for i, t in enumerate(temps):
        for j, s in enumerate(sets):
            ax = axes[i][j]
            for method, (tau, acc) in runs.get((s, t), {}).items():
                ax.plot(range(1, len(acc) + 1), acc, marker="o", ms=3,
                        label=f"{method} (τ {tau:.2f})")
            ax.set_title(f"{s}, T={t}", fontsize=9)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
            if i == len(temps) - 1:
                ax.set_xlabel("draft position")
            if j == 0:
                ax.set_ylabel("P(accept | previous accepted)")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}: {len(runs)} panels")


if __name__ == "__main__":
    main(*sys.argv[1:3])
