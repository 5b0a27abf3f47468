"""Condenses a bench_layers.py result file into the README's speed table (and updates README.md in place).

Usage::

    python bench/bench_layers.py --out bench/results/cpu_epyc_avx512.md
    python bench/readme_table.py bench/results/cpu_epyc_avx512.md   # prints the table and rewrites README.md

The ratio columns give the wall-clock ratio at torch's default thread count (as users run it) beside the CPU-time
ratio on one thread (steadier on a shared machine), from a result timed in both modes (``--modes cpu1,wall``,
bench_layers.py's default on CPU); a column whose mode the result lacks shows ``-``. The result file is named on the
command line (results of several machines lie side by side in bench/results/); the table's last line links it.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-table-start -->", "<!-- bench-table-end -->"
CPU1 = "1 thread CPU time"  # bench_layers.Mode.label of mode cpu1


def _section(text: str, title: str) -> Optional[tuple[list[str], dict[tuple[str, str], list[str]]]]:
    """The column names and the rows, keyed (shape, format), of the first table whose heading starts with ``title``;
    ``None`` when there is none."""
    section = next((s for s in text.split("### ") if s.startswith(title)), None)
    if section is None:
        return None
    lines = [ln.strip().strip("|") for ln in section.splitlines() if ln.startswith("| ")]
    cells = [[c.strip() for c in ln.split("|")] for ln in lines]
    return cells[0], {(r[0], r[1]): r for r in cells[1:] if r[0].startswith("(")}


def _ratio(cell: str, brackets: bool = False) -> str:
    m = re.search(r"\[(\d+\.\d+)x\]" if brackets else r"\((\d+\.\d+)x\)", cell)
    return f"{m.group(1)}x" if m else "-"


def _paired(cell: str, interval: bool = True) -> str:
    """``0.987x (0.962-1.004)`` (a paired ratio and its interval) as ``0.99x (0.96-1.00)`` (``0.99x`` without
    ``interval``)."""
    m = re.fullmatch(r"(\d+\.\d+)x(?: \((\d+\.\d+)-(\d+\.\d+)\))?", cell)
    if not m:
        return "-"
    out = f"{float(m.group(1)):.2f}x"
    return out + (f" ({float(m.group(2)):.2f}-{float(m.group(3)):.2f})" if interval and m.group(2) else "")


def _cell(table: Optional[tuple[list[str], dict]], key: tuple[str, str], column: str) -> str:
    """The cell of ``column`` in row ``key``; ``-`` when the table, the row or the column is missing."""
    if table is None or column not in table[0] or key not in table[1]:
        return "-"
    return table[1][key][table[0].index(column)]


def table(text: str, link: str) -> str:
    """The README's table from a ``bench_layers.py`` result ``text``; its last line links the full tables at ``link``."""
    m = re.search(r"torch threads by default: (\d+)", text)
    if m is None:
        raise SystemExit("not a result of the current bench_layers.py (its header names no 'torch threads by default')")
    n = int(m.group(1))
    wall = f"wall, {n} thread{'' if n == 1 else 's'}"  # bench_layers.Mode.label of mode wall
    main = _section(text, f"Time, forward + backward, {wall}")
    if main is None:
        raise SystemExit(f"no table timed '{wall}' (torch's default thread count) in the result: run bench_layers.py "
                         "with its default --modes")
    paired = _section(text, "Paired")
    throughput = _section(text, f"Memory throughput, {wall}")
    memory = _section(text, "Saved")
    w, c = "wall", "1 thr. CPU"
    lines = [
        f"| shape | format | batchnorm (ms, {w}) | renorm ({w}) | renorm ({c}) | compiled renorm / compiled batchnorm "
        f"({w}; 95% interval) | compiled ({c}; 95% interval) | renorm, microbatches of 4 ({w}) "
        f"| renorm, microbatches of 4 ({c}) | renorm's GB/s, fraction of a copy's ({w}) | literal Alg. 1 ({w}) "
        f"| renorm, Python path, no C++ ({w}) | saved for backward, renorm / batchnorm (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in main[1].items():
        shape, fmt = key
        name = "channels_last" if fmt == "channels_last" else ("NC" if shape.count(",") == 1 else "NCHW")

        def pair(head: str, mode: str, interval: bool = False) -> str:
            return _paired(_cell(paired, key, f"{head}, {mode}"), interval)

        mem = _cell(memory, key, "brn").split()[0] + " / " + _cell(memory, key, "bn").split()[0]
        fraction = _cell(throughput, key, "brn eager, of copy").split(" ")[0]
        lines.append(
            f"| {shape} | {name} | {r[2]} | {pair('brn / bn', wall)} | {pair('brn / bn', CPU1)} "
            f"| {pair('brn compiled / bn compiled', wall, True)} | {pair('brn compiled / bn compiled', CPU1, True)} "
            f"| {pair('brn mb4 / bn', wall)} | {pair('brn mb4 / bn', CPU1)} | {fraction} | {_ratio(r[4])} "
            f"| {_ratio(r[7])} | {mem} |"
        )
    meta = {k: v for k, v in re.findall(r"^- (date|device): (.*)$", text, flags=re.M)}
    return "\n".join(lines) + (
        f"\n\nRun: {meta.get('date', '?')}; {meta.get('device', '?')}. {w}: wall-clock time at torch's default "
        f"{n} thread{'' if n == 1 else 's'}; {c}: CPU time of the process on 1 thread. Ratios: paired medians over "
        "repetitions (renorm / batchnorm in the same round); literal and Python path: ratios of medians. "
        f"Full tables: [{link}]({link}).\n"
    )


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a bench_layers.py result (its --out file)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    # the link to the full tables: the result's path as seen from the README's folder
    link = Path(os.path.relpath(args.result.resolve(), args.readme.resolve().parent)).as_posix()
    out = table(args.result.read_text(), link)
    print(out)
    readme = args.readme.read_text()
    a, b = readme.index(START) + len(START), readme.index(END)
    args.readme.write_text(readme[:a] + "\n" + out + readme[b:])


if __name__ == "__main__":
    main()
