"""Condenses a bench_layers.py result file into the README's speed table (and updates README.md in place).

Usage::

    python bench/bench_layers.py --threads 1 --clock cpu --out bench/results/cpu_epyc_avx512.md
    python bench/readme_table.py bench/results/cpu_epyc_avx512.md   # prints the table and rewrites README.md

The result file is named on the command line (results of several machines lie side by side in bench/results/);
the table's last line links it.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-table-start -->", "<!-- bench-table-end -->"


def _rows(text: str, title: str) -> list[list[str]]:
    section = next(s for s in text.split("### ") if s.startswith(title))
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines() if line.startswith("| (")]


def _ratio(cell: str, brackets: bool = False) -> str:
    m = re.search(r"\[(\d+\.\d+)x\]" if brackets else r"\((\d+\.\d+)x\)", cell)
    return f"{m.group(1)}x" if m else "-"


def _paired(cell: str) -> str:
    """``0.987x (0.962-1.004)`` (a paired ratio and its interval) as ``0.99x (0.96-1.00)``."""
    m = re.fullmatch(r"(\d+\.\d+)x(?: \((\d+\.\d+)-(\d+\.\d+)\))?", cell)
    if not m:
        return "-"
    out = f"{float(m.group(1)):.2f}x"
    return out + (f" ({float(m.group(2)):.2f}-{float(m.group(3)):.2f})" if m.group(2) else "")


def table(text: str, link: str) -> str:
    """The README's table from a ``bench_layers.py`` result ``text``; its last line links the full tables at ``link``."""
    main = _rows(text, "Time")
    micro = {(r[0], r[1]): r for r in _rows(text, "microbatch")}
    memory = {(r[0], r[1]): r for r in _rows(text, "Saved")}
    paired = {(r[0], r[1]): r for r in _rows(text, "Paired")} if "### Paired" in text else {}
    lines = [
        "| shape | format | batchnorm (ms) | renorm | literal Alg. 1 | renorm, microbatches of 4 "
        "| compiled renorm / compiled batchnorm (95% interval) | saved for backward, renorm / batchnorm (MiB) "
        "| renorm, Python path (no C++) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in main:
        key = (r[0], r[1])
        fmt = "channels_last" if r[1] == "channels_last" else ("NC" if r[0].count(",") == 1 else "NCHW")
        mb = micro.get(key)
        mem = memory[key]
        pair = paired.get(key)
        compiled = _paired(pair[3]) if pair else _ratio(r[6], brackets=True)
        lines.append(
            f"| {r[0]} | {fmt} | {r[2]} | {_ratio(r[3])} | {_ratio(r[4])} | {_ratio(mb[3]) if mb else '-'} "
            f"| {compiled} | {mem[4].split()[0]} / {mem[3].split()[0]} "
            f"| {_ratio(r[7]) if len(r) > 7 else '-'} |"
        )
    meta = {k: v for k, v in re.findall(r"^- (date|device): (.*)$", text, flags=re.M)}
    return "\n".join(lines) + f"\n\nRun: {meta.get('date', '?')}; {meta.get('device', '?')}. Full tables: [{link}]({link}).\n"


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
