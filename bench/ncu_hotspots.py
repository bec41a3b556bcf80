"""Where a kernel's warps stall, by source line: reads the CSV of an ncu report's source page and
prints the lines with the most warp-stall samples (their share of all samples), so one device
call can say which line of a latency-bound kernel holds its time.

    ncu --set full --import-source yes -o rep --kernel-name regex:K --launch-count 1 python3 ...
    ncu -i rep.ncu-rep --page source --csv --print-source sass > src.csv   # (cuda: by line, where
                                                  # that ncu gives the view sample columns)
    python bench/ncu_hotspots.py src.csv --top 30

The column names differ between ncu versions: the samples column is the first whose name holds
"Stall Sampling (All" (else "Stall Sampling", else "Samples"); a file without one (an ncu error
message, a version without the source page) is printed as it is, with a note.
"""
import argparse
import csv
import io
import sys


def number(text: str) -> float:
    try:
        return float(text.replace(",", "")) if text.strip() else 0.0
    except ValueError:
        return 0.0


def pick(header: list, *keys: str):
    for key in keys:
        for i, name in enumerate(header):
            if key in name:
                return i
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv_path")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    text = open(a.csv_path, errors="replace").read()
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "Source" in line and "," in line), None)
    if start is None:
        print(f"ncu_hotspots: no source table in {a.csv_path}; its first lines:")
        print("\n".join(lines[:20]))
        return 1
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, body = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    col = pick(header, "Stall Sampling (All", "Stall Sampling", "Samples")
    src = pick(header, "Source")
    line_col = pick(header, "# Line", "Line", "# Address", "Address")
    if col is None or src is None:
        print(f"ncu_hotspots: no samples column among {header}")
        return 1
    total = sum(number(r[col]) for r in body) or 1.0
    print(f"{len(body)} source rows, {total:.0f} samples ({header[col]})")
    for r in sorted(body, key=lambda r: -number(r[col]))[:a.top]:
        where = r[line_col] if line_col is not None else "?"
        print(f"{100 * number(r[col]) / total:6.2f} %  {where:>6}  {r[src].strip()[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
