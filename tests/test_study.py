"""The reproduction study (``python -m lightning_brn.study``): its plan, statistics, page, and --quick end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_brn import study
from lightning_brn.study import Cell, compare, plan_cells, write_report

FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- the plan
def test_plan_core_first_then_exploration_and_names_unique() -> None:
    cells = plan_cells(steps=3000, seeds=[0, 1, 2], short_steps=1000)
    core = [c for c in cells if c.variant == "core" and c.steps == 3000]
    assert len(core) == 4 * 2 * 3 and cells[: len(core)] == core  # the core runs first
    assert {(c.setting, c.norm) for c in core} == {(s, n) for s in ("iid", "micro4", "micro2", "noniid")
                                                    for n in ("bn", "brn")}
    explore = cells[len(core):]
    assert {c.variant for c in explore} == {"core", "alpha0.01", "tight"}
    assert all(c.norm == "brn" for c in explore if c.variant != "core")  # variants change renorm only
    assert {c.steps for c in explore} == {1000} and {c.seed for c in explore} == {0, 1}  # at the second length
    assert len(explore) == 3 * 2 * 2 + 2 * 2 * 2  # {iid, micro4, noniid} x {bn, brn}, {alpha, tight} x 2 settings
    variants = [c for c in explore if c.variant != "core"]
    assert explore.index(variants[0]) == 6  # after the batchnorm/renorm pairs of that seed they are compared with
    assert len({c.name for c in cells}) == len(cells)
    assert plan_cells(steps=100, seeds=[5], explore=False) == [c for c in plan_cells(steps=100, seeds=[5])
                                                               if c.variant == "core" and c.steps == 100]


def test_cell_command_goes_through_the_recipes_with_fitted_schedules(tmp_path: Path) -> None:
    a = Cell("micro2", "brn", 2, 3000, "tight").args(tmp_path, 600, 600, 512)
    assert a[:3] == ["fit", "--recipe", "fmnist_microbatch_brn"]
    joined = " ".join(a)
    assert "--model.microbatch_size 2" in joined
    assert "--seed_everything 2 --data.init_args.seed 2" in joined  # weights and batches both follow the seed
    assert "--model.lr_scheduler.init_args.step_size 37" in joined  # 81 decays over 3,000 steps, as the recipes
    schedule = json.loads(a[a.index("--model.renorm_schedule") + 1])["init_args"]
    assert (schedule["rmax"], schedule["dmax"], schedule["warmup_steps"], schedule["momentum"]) == (1.5, 0.5, 115, 0.1)
    alpha_args = Cell("noniid", "brn", 0, 3000, "alpha0.01").args(tmp_path, 1, 1, 1)
    alpha = json.loads(_arg(alpha_args, "--model.renorm_schedule"))["init_args"]
    assert alpha["momentum"] == 0.01 and alpha["rmax"] == 3.0
    core = Cell("noniid", "bn", 0, 3000).args(tmp_path, 600, 600, 512)
    assert core[2] == "fmnist_noniid_bn" and "--model.renorm_schedule" not in core  # the recipe's own: for_run


def _arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_help_explains_every_option(capsys: pytest.CaptureFixture) -> None:
    parser = study._parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings} has no help"
    with pytest.raises(SystemExit):
        study.main(["--help"])
    out = capsys.readouterr().out
    for opt in ("--quick", "--report-only", "--jobs", "--seeds", "--steps", "--short-steps", "--list"):
        assert opt in out


# ----------------------------------------------------------------------------- statistics and the page
def _result(setting: str, norm: str, seed: int, top1: float, steps: int = 100, variant: str = "core") -> dict:
    curve = [(50, top1 - 5.0), (100, top1)]
    return {
        "cell": {"setting": setting, "norm": norm, "seed": seed, "steps": steps, "variant": variant,
                 "limit_train": None, "limit_val": None},
        "top1": top1, "val": curve,
        "gap_train": [(50, 80.0), (100, top1 + (3.0 if norm == "bn" else 0.0))],
        "gap_eval": [(50, 80.0), (100, top1)],
        "brn": {"rmax": [(50, 2.0), (100, 3.0)], "mean_abs_d": [(50, 0.1), (100, 0.2)]} if norm == "brn" else {},
        "seconds": 10.0, "command": f"lightning-brn fit --recipe x --seed_everything {seed}",
    }


def _fake_results() -> list[dict]:
    top = {("iid", "bn"): 90.0, ("iid", "brn"): 90.2, ("micro4", "bn"): 86.0, ("micro4", "brn"): 88.0,
           ("micro2", "bn"): 80.0, ("micro2", "brn"): 89.0, ("noniid", "bn"): 70.0, ("noniid", "brn"): 85.0}
    return [_result(s, n, seed, v + 0.1 * seed) for (s, n), v in top.items() for seed in (0, 1, 2)]


def test_compare_share_recovered_and_seed_separation() -> None:
    res = _fake_results()
    c = compare(res, "noniid", 100)
    assert c["bn_mean"] == pytest.approx(70.1) and c["brn_mean"] == pytest.approx(85.1)
    assert c["loss"] == pytest.approx(20.0)  # against batchnorm's own i.i.d. run (90.1)
    assert c["share"] == pytest.approx(15.0 / 20.0)
    assert c["separated"] and c["diff_std"] == pytest.approx(0.0)
    # overlapping seeds are not "beyond the spread"
    res2 = [r for r in res if r["cell"]["setting"] != "iid"] + [_result("iid", "bn", 0, 90.0),
                                                               _result("iid", "brn", 0, 90.0)]
    res2 += [_result("micro4", "brn", 3, 85.0)]
    assert not compare(res2, "micro4", 100)["separated"]
    assert compare(res, "noniid", 999) is None


def test_page_tables_verdicts_and_kept_conclusions(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    page, plots = tmp_path / "docs" / "reproduction.md", tmp_path / "docs" / "reproduction"
    meta = {"command": "python -m lightning_brn.study", "machine": study._machine(), "wall_minutes": 1.0}
    write_report(_fake_results(), page, plots, 100, None, meta)
    text = page.read_text()
    summary = text[text.index("## Summary"): text.index("## iid")]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (iid|micro4|micro2|noniid) \|.*$", summary, re.M)}
    assert set(rows) == {"iid", "micro4", "micro2", "noniid"}
    assert "**met**" in rows["iid"]  # +0.2 within 0.5
    assert "2.00 of 4.00 = 50%" in rows["micro4"] and "**missed**" in rows["micro4"]  # goal 60%
    assert "9.00 of 10.00 = 90%" in rows["micro2"] and "**met**" in rows["micro2"]
    assert "15.00 of 20.00 = 75%" in rows["noniid"] and "**missed**" in rows["noniid"]  # goal 80%
    assert "74.2 / 76.5 (56%)" in rows["micro4"] and "67.0 / 78.5 (102%)" in rows["noniid"]  # the paper beside
    for png in ("val_top1.png", "train_eval_gap.png", "brn_metrics.png"):
        assert (plots / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](reproduction/{png})" in text
    # hand-written conclusions survive a regeneration
    page.write_text(text.replace("(to be written from the tables above)", "Use renorm when batches are small."))
    study_write_plots, study.write_plots = study.write_plots, lambda *a, **k: []  # (the plots were checked above)
    try:
        write_report(_fake_results(), page, plots, 100, None, meta)
    finally:
        study.write_plots = study_write_plots
    assert "Use renorm when batches are small." in page.read_text()


def test_read_metrics_counts_optimizer_steps(tmp_path: Path) -> None:
    f = tmp_path / "metrics.csv"
    f.write_text("epoch,step,train/loss,val/acc1\n0,49,1.5,\n0,99,,0.8\n")
    assert study._read_metrics(f) == {"train/loss": [(50, 1.5)], "val/acc1": [(100, 0.8)]}


def test_probe_batchrenorm_train_mode_equals_eval_mode_unless_clipped() -> None:
    """Unclipped r and d make renorm's training-mode output exactly its inference output, what the probe shows as a
    zero gap; batchnorm's training mode (batch statistics) differs."""
    import torch

    from lightning_brn.module import TimmClassifier

    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28) * 2 + 1
    for norm, equal in (("brn", True), ("bn", False)):
        m = TimmClassifier("test_resnet", num_classes=10, in_chans=1, normalization=norm)
        m.train()
        for _ in range(3):  # move the moving averages away from their initial values
            with torch.no_grad():
                m(torch.randn(32, 1, 28, 28))
        for layer in m.modules():
            if hasattr(layer, "rmax"):
                layer.rmax, layer.dmax, layer.momentum = 1e6, 1e6, 0.0
        with torch.no_grad():
            m.train()
            a = m(x[:32])
            m.eval()
            b = m(x[:32])
        assert torch.allclose(a, b, atol=1e-3) == equal


# ----------------------------------------------------------------------------- --quick, end to end
@pytest.mark.slow
@pytest.mark.skipif(not (FMNIST / "train-labels-idx1-ubyte.gz").is_file() and not (FMNIST / "train-labels-idx1-ubyte").is_file(),
                    reason="Fashion-MNIST not installed (scripts/setup.sh installs it)")
def test_quick_study_end_to_end_and_resumes(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "lightning_brn.study", "--quick", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    page = out / "reproduction.md"
    text = page.read_text()
    for setting in ("iid", "micro4", "micro2", "noniid"):
        row = re.search(rf"^\| {setting} \| ([0-9.]+) ± ([0-9.]+) \| ([0-9.]+) ± ([0-9.]+) \| ([+-][0-9.]+) \|",
                        text, re.M)
        assert row, f"no parsable summary row for {setting}"
        bn, brn, diff = float(row.group(1)), float(row.group(3)), float(row.group(5))
        assert 0 <= bn <= 100 and 0 <= brn <= 100 and diff == pytest.approx(brn - bn, abs=0.011)
    for png in ("val_top1.png", "train_eval_gap.png", "brn_metrics.png"):
        assert (out / "reproduction" / png).read_bytes()[:4] == b"\x89PNG"
    results = [json.loads(f.read_text()) for f in out.glob("cells/*/result.json")]
    assert len(results) == 8
    for r in results:
        assert r["val"][-1][0] == 60 and r["gap_train"] and r["gap_eval"]
        assert (r["cell"]["norm"] == "brn") <= bool(r["brn"].get("rmax"))  # renorm runs log brn/ metrics
    # a second start trains nothing: every cell is finished
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and "8 finished earlier, 0 to run" in again.stdout
