"""The benchmark scripts (bench/): they run, print the tables the README is made from, and the README's
table is regenerated from their output. Short runs (a few repetitions of small shapes); the timings are not
asserted, the saved-memory figures are (they do not depend on timing)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(script: str, *args: str, timeout: int = 600) -> str:
    res = subprocess.run(  # from the repository root, as the README runs them
        [sys.executable, f"bench/{script}", *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _table(text: str, title: str) -> list[list[str]]:
    section = next(s for s in text.split("### ") if s.startswith(title))
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in section.splitlines() if ln.startswith("| (")]


def _assert_paired_ratio(cell: str, context: object) -> None:
    """A paired-ratio cell, ``"1.002x (0.990-1.010)"``: a median inside its interval."""
    m = re.fullmatch(r"(\d+\.\d{3})x \((\d+\.\d{3})-(\d+\.\d{3})\)", cell)
    assert m and float(m.group(2)) <= float(m.group(1)) <= float(m.group(3)), context


def _mib(cell: str) -> float:
    return float(cell.split()[0])  # "0.39 (3)": MiB, then the number of saved tensors


@pytest.fixture(scope="module")
def layers_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("bench") / "cpu.md"
    stdout = _run(
        "bench_layers.py", "--quick", "--reps", "6", "--warmup", "1", "--sample-ms", "2", "--shapes", "3,5",
        "--formats", "contiguous", "--out", str(out),  # default modes: cpu1 and wall at torch's default threads
    )
    return stdout, out


def test_bench_layers_prints_every_column_and_saves_no_more_than_batchnorm(layers_result):
    stdout, out = layers_result
    written = out.read_text()
    assert "- command: `python bench/bench_layers.py" in written and "- allocator: " in written
    for title in ("Time", "microbatch", "Paired", "Memory throughput", "Saved"):
        assert _table(written, title) == _table(stdout, title)
    threads = int(re.search(r"torch threads by default: (\d+)", stdout).group(1))
    modes = ["1 thread CPU time", f"wall, {threads} thread{'' if threads == 1 else 's'}"]  # the default --modes
    for mode in modes:  # a time table and a microbatch table per mode
        rows = _table(stdout, f"Time, forward + backward, {mode}")
        assert [r[0] for r in rows] == ["(4, 512, 7, 7)", "(256, 1024)"]
        for r in rows:
            assert re.fullmatch(r"\d+\.\d{3}", r[2]), r  # batchnorm eager, ms
            for cell in r[3:5] + r[7:8]:
                assert re.fullmatch(r"\d+\.\d{3} \(\d+\.\d+x\)", cell), r
            for cell in r[5:7]:  # compiled: a time and, for renorm, the ratio to compiled batchnorm
                assert not cell.startswith("FAIL"), r
            assert re.search(r"\[\d+\.\d+x\]", r[6]), r
        assert [r[0] for r in _table(stdout, f"microbatch_size=4, {mode}")] == ["(4, 512, 7, 7)", "(256, 1024)"]
    paired_section = next(s for s in stdout.split("### ") if s.startswith("Paired"))
    heads = next(ln for ln in paired_section.splitlines() if ln.startswith("| shape")).strip("| ").split(" | ")
    pairs = ("brn / bn", "brn compiled / bn compiled", "brn mb4 / bn", "brn mb4 compiled / bn compiled")
    assert heads[2:] == [f"{p}, {m}" for p in pairs for m in modes]  # the two modes side by side
    paired = _table(stdout, "Paired")
    assert [r[0] for r in paired] == ["(4, 512, 7, 7)", "(256, 1024)"]
    for r in paired:  # eager, compiled, microbatches eager and compiled, each mode: a median inside its interval
        assert len(r) == 10, r
        for cell in r[2:]:
            _assert_paired_ratio(cell, r)
    for mode in modes:  # a plain copy's GB/s and the eager steps' (5 tensors moved), with their fraction of it
        rows = _table(stdout, f"Memory throughput, {mode}")
        assert [r[0] for r in rows] == ["(4, 512, 7, 7)", "(256, 1024)"]
        for _, _, mib, copy_gbps, bn_gbps, bn_frac, brn_gbps, brn_frac in rows:
            assert all(re.fullmatch(r"\d+\.\d+", c) and float(c) > 0 for c in (mib, copy_gbps, bn_gbps, brn_gbps))
            for frac in (bn_frac, brn_frac):
                m = re.fullmatch(r"(\d+\.\d{2}) \((\d+\.\d{2})-(\d+\.\d{2})\)", frac)
                assert m and float(m.group(2)) <= float(m.group(1)) <= float(m.group(3)), frac
    for r in _table(stdout, "Saved"):
        _, _, _, bn, brn, literal, _bn_c, brn_c = r[:8]
        assert _mib(brn) <= _mib(bn) and _mib(brn_c) <= _mib(bn), r
        assert _mib(literal) > 2 * _mib(bn), r  # the autograd-op Algorithm 1 keeps about three inputs' worth


def _load_bench_script(script: str) -> ModuleType:
    """Imports ``bench/<script>`` as a module of its own (``main(argv)`` can then run in this process)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{Path(script).stem}", ROOT / "bench" / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_needs_the_result_named(capsys):
    # results of several machines lie side by side: the table is made only from the file the command names
    module = _load_bench_script("readme_table.py")
    with pytest.raises(SystemExit) as exc:
        module.main([])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "the following arguments are required: result" in err, err


def test_readme_table_is_regenerated_from_a_result(layers_result, tmp_path):
    _, out = layers_result
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-table-start -->\nold table\n<!-- bench-table-end -->\noutro\n")
    printed = _run("readme_table.py", str(out), "--readme", str(readme))
    text = readme.read_text()
    assert text.startswith("intro\n<!-- bench-table-start -->\n| shape | format |") and text.endswith(
        "<!-- bench-table-end -->\noutro\n"
    )
    assert "old table" not in text and printed.strip() in text
    # the full tables are linked where they are: the result file itself, relative to the README's folder
    link = Path(os.path.relpath(out, readme.parent)).as_posix()
    assert link.endswith("/cpu.md") and f"Full tables: [{link}]({link})." in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| (")]
    assert [ln.split("|")[1].strip() for ln in rows] == ["(4, 512, 7, 7)", "(256, 1024)"]
    assert rows[1].split("|")[2].strip() == "NC"
    for ln in rows:  # renorm / batchnorm, wall at default threads beside 1-thread CPU time: eager, then compiled
        cells = [c.strip() for c in ln.split("|")]
        assert all(re.fullmatch(r"\d+\.\d{2}x", c) for c in cells[4:6]), ln
        for c in cells[6:8]:  # compiled: the paired median and its interval
            assert re.fullmatch(r"\d+\.\d{2}x \(\d+\.\d{2}-\d+\.\d{2}\)", c), ln
        assert re.fullmatch(r"\d+\.\d{2}", cells[10]), ln  # renorm's fraction of a copy's GB/s


def test_median_interval_covers_the_median_at_95_percent():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_layers import median_interval_ranks
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from math import comb

    assert median_interval_ranks(5) is None and median_interval_ranks(15) == (3, 11)
    for n in range(6, 60):
        lo, hi = median_interval_ranks(n)
        # P(x_(lo) <= median <= x_(hi)) = P(lo < B <= hi) for B ~ Binomial(n, 1/2), B = #values below the median
        coverage = sum(comb(n, k) for k in range(lo + 1, hi + 1)) / 2**n
        assert coverage >= 0.95, n
        narrower = sum(comb(n, k) for k in range(lo + 2, hi)) / 2**n  # one rank in on each side
        assert narrower < 0.95, n


def test_bench_overhead_prints_both_inputs():
    stdout = _run("bench_overhead.py", "--reps", "2", "--inner", "2", "--scale-shape", "2,16,4,4")
    rows = [ln for ln in stdout.splitlines() if ln.startswith("| (")]
    assert [ln.split("|")[1].strip() for ln in rows] == ["(4, 64, 1, 1)", "(2, 16, 4, 4)"]
    for ln in rows:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")[1:]]
        assert re.fullmatch(r"\d+\.\d", cells[0]) and re.fullmatch(r"\d+\.\d \[[+-]\d+\.\d\]", cells[1]), ln


def test_bench_overhead_in_a_model_reports_the_difference_per_layer():
    stdout = _run("bench_overhead.py", "--reps", "2", "--inner", "1", "--in-model", "2", "--shape", "2,8,2,2",
                  "--scale-shape", "2,8,3,3")
    assert "compiled model of 2 blocks" in stdout and "--in-model 2`" in stdout, stdout
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in stdout.splitlines() if ln.startswith("| (")]
    assert [r[0] for r in rows] == ["(2, 8, 2, 2)", "(2, 8, 3, 3)"]
    for _, bn_eager, brn_eager, bn_comp, brn_comp in rows:
        for bn, brn in ((bn_eager, brn_eager), (bn_comp, brn_comp)):
            m = re.fullmatch(r"(\d+\.\d) \[([+-]\d+\.\d)\]", brn)
            assert m, brn
            assert float(m.group(2)) == pytest.approx((float(m.group(1)) - float(bn)) / 2, abs=0.11)


def test_bench_model_times_a_converted_model_eager_and_compiled(tmp_path):
    out = tmp_path / "model.md"
    stdout = _run(
        "bench_model.py", "--models", "test_resnet", "--batch", "4", "--size", "32", "--reps", "6", "--warmup", "1",
        "--sample-ms", "1", "--out", str(out),
    )
    assert "- command: `python bench/bench_model.py --models test_resnet" in out.read_text()
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in stdout.splitlines() if ln.startswith("| test_")]
    assert len(rows) == 1
    name, layers, shape, bn_eager, brn_eager, bn_compiled, brn_compiled = rows[0]
    assert name == "test_resnet" and int(layers) > 0 and shape == "(4, 3, 32, 32) NCHW"
    assert re.fullmatch(r"\d+\.\d{2}", bn_eager) and re.fullmatch(r"\d+\.\d{2}", bn_compiled), rows
    for cell in (brn_eager, brn_compiled):
        _assert_paired_ratio(cell, rows)


def test_bench_kernels_times_the_generated_forward_and_backward(tmp_path):
    out = tmp_path / "kernels.md"
    stdout = _run(
        "bench_kernels.py", "--shapes", "3,5", "--formats", "channels_last", "--reps", "6", "--warmup", "1",
        "--sample-ms", "1", "--out", str(out),
    )
    assert "- command: `python bench/bench_kernels.py --shapes 3,5" in out.read_text()
    rows = _table(stdout, "Generated code alone")
    assert [r[:2] for r in rows] == [["(4, 512, 7, 7)", "channels_last"], ["(256, 1024)", "contiguous"]]
    for r in rows:
        assert all(re.fullmatch(r"\d+\.\d", r[i]) for i in (2, 3, 5, 6)), r  # microseconds
        for cell in (r[4], r[7], r[8]):
            _assert_paired_ratio(cell, r)


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("bench_model.py", ["--batch", "0"], "--batch must be >= 1, got 0"),
        ("bench_model.py", ["--reps", "0"], "--reps must be >= 1, got 0"),
        ("bench_model.py", ["--microbatch-size", "3"], "--microbatch-size must be >= 1 and divide --batch 8, got 3"),
        ("bench_overhead.py", ["--in-model", "-1"], "--in-model expects a number of blocks >= 0, got -1"),
        ("bench_kernels.py", ["--reps", "0"], "--reps must be >= 1, got 0"),
        ("bench_kernels.py", ["--sample-ms", "0"], "--sample-ms must be > 0, got 0.0"),
        ("bench_kernels.py", ["--shapes", "9"], "--shapes '9': expected comma-separated indices in 0-5"),
        ("bench_kernels.py", ["--formats", "nhwc"], "--formats 'nhwc': expected contiguous and/or channels_last, got ['nhwc']"),
        ("bench_layers.py", ["--modes", "cpu1,wall0"], "--modes 'cpu1,wall0': expected cpu<N> or wall<N>"),
        ("bench_layers.py", ["--modes", "wall", "--clock", "cpu"], "give either them or --modes"),
    ],
)
def test_bench_scripts_refuse_bad_arguments_naming_them(script, args, message, capsys, monkeypatch):
    # in this process (the scripts' main(argv)), not one Python start and torch import per case; what importing
    # them changes (sys.path, sys.modules, torch's thread count) is put back afterwards
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "path", [str(ROOT / "bench"), *sys.path])  # they import _common, bench_layers
    before = set(sys.modules)
    try:
        module = _load_bench_script(script)
        with pytest.raises(SystemExit) as exc:
            module.main(["--malloc", "default", *args])
    finally:
        torch.set_num_threads(threads)
        bench = str(ROOT / "bench")
        for name in set(sys.modules) - before:  # the bench scripts' own modules (not what they import)
            if str(getattr(sys.modules[name], "__file__", "") or "").startswith(bench):
                del sys.modules[name]
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err, err[-2000:]


def test_bench_distributed_prints_a_paired_ratio_per_mode():
    """2 gloo processes, timm's test_resnet at 16x16, 3 rounds of 1 step: every mode gets a row whose median ratio to
    the baseline lies inside its interval, and the baseline's ratio is 1."""
    stdout = _run(
        "bench_distributed.py", "--model", "test_resnet", "--batch", "2", "--size", "16", "--steps", "1", "--rounds", "3",
        "--warmup", "1", "--modes", "local,shared,sync,bn", timeout=300,
    )
    assert "world 2 (gloo)" in stdout and "| mode | median step (ms) | vs local" in stdout, stdout
    rows = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"\| (\w+) \| (\d+\.\d{2}) \| (\d+\.\d{3}) \[(\d+\.\d{3}), (\d+\.\d{3})\] \|", line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.groups()[1:]]
    assert list(rows) == ["local", "shared", "sync", "bn"], stdout
    assert rows["local"][1:] == [1.0, 1.0, 1.0]
    for mode, (ms, ratio, lo, hi) in rows.items():
        assert ms > 0 and lo <= ratio <= hi, (mode, stdout)
