"""The MoG setup study in sweeps/mog_table1.py: config flags, the shared GAN run of configs that differ only in
top-k flags, the pre-registered decision rule, the Welch test, the report and its picture, and one real tiny cell."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
from PIL import Image
from scipy import stats

from conftest import REPO, assert_one_line_error

import mog_topk

spec = importlib.util.spec_from_file_location("mog_table1", REPO / "sweeps" / "mog_table1.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)

ITER = 50000


def fake_run(out_root, config, variant, seed, hq, modes, rkl=0.5, resumed_from_step=0, it_per_s=50.0):
    """A finished run folder as mog_topk.py leaves it (only what the report reads; args.json names the run, since
    run folders are matched by it). wall_time_s and it_per_s are those of the run's last process, as in
    mog_topk.py: a resumed run's wall time covers only its last part."""
    folder = sweep.cell_folder(out_root, config, variant) / f"mog25_{variant}__{seed}__{1000 + seed}"
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"exp_name": f"mog25_{variant}", "seed": seed,
                                                  "command": f"mog_topk.py --seed {seed}"}))
    (folder / "summary.json").write_text(json.dumps({"step": ITER, "seed": seed, "high_quality": hq / 100,
                                                     "modes_recovered": modes / 100, "reverse_kl": rkl,
                                                     "resumed_from_step": resumed_from_step, "it_per_s": it_per_s,
                                                     "wall_time_s": (ITER - resumed_from_step) / it_per_s}))


def test_config_flags_and_the_shared_gan_run(tmp_path):
    assert sweep.config_flags("slowk", "gan") == ["--setup", "base"]  # the k schedule does not exist without --topk
    assert sweep.config_flags("slowk", "topk") == ["--setup", "slowk"]
    assert sweep.cell_folder(tmp_path, "slowk", "gan") == tmp_path / "base"
    assert sweep.cell_folder(tmp_path, "slowk", "topk") == tmp_path / "slowk"
    assert sweep.cell_folder(tmp_path, "all", "gan") == tmp_path / "all"
    assert list(sweep.CONFIGS) == list(mog_topk.SETUPS)


# The flags each config stood for when the study started (its change from the pre-study defaults of mog_topk.py).
PRE_STUDY = ["--grid-spacing", "2", "--hidden-layers", "3", "--beta1", "0.5", "--beta2", "0.999"]
PRE_STUDY_TOPK = ["--iters-per-epoch", "500", "--mu", "128"]  # later flags (a config's changes) override these
CHANGES = {"base": ([], []), "spacing1": (["--grid-spacing", "1"], []), "depth4": (["--hidden-layers", "4"], []),
           "slowk": ([], ["--iters-per-epoch", "2000", "--mu", "192"]), "betas": (["--beta1", "0.9", "--beta2", "0.99"], []),
           "all": (["--grid-spacing", "1", "--hidden-layers", "4", "--beta1", "0.9", "--beta2", "0.99"],
                   ["--iters-per-epoch", "2000", "--mu", "192"])}


@pytest.mark.parametrize("config", list(CHANGES))
@pytest.mark.parametrize("variant", ["gan", "topk"])
def test_setup_flag_resolves_to_the_flags_the_study_started_with(config, variant):
    # The runs made before --setup existed recorded these resolved values in args.json; a sweep compares them.
    topk_flags = ["--topk"] if variant == "topk" else []
    common_changes, topk_changes = CHANGES[config]
    pre_study = PRE_STUDY + (PRE_STUDY_TOPK + topk_flags if variant == "topk" else [])
    old = vars(mog_topk.parse_args(pre_study + common_changes + (topk_changes if variant == "topk" else [])))
    new = vars(mog_topk.parse_args(sweep.config_flags(config, variant) + topk_flags))
    assert {k: v for k, v in new.items() if k != "setup"} == {k: v for k, v in old.items() if k != "setup"}


def test_decision_rule_uses_only_the_gan_rows(tmp_path):
    gan = {"base": (93, 73), "spacing1": (97, 84), "depth4": (90, 95), "betas": (80, 100), "all": (88, 92)}
    for config, (hq, modes) in gan.items():
        for seed in (1, 2, 3):
            fake_run(tmp_path, config, "gan", seed, hq + seed - 2, modes)
    chosen, distances = sweep.decide(tmp_path, [1, 2, 3], ITER)
    # |HQ - 85.6| + |modes - 100|, mean over seeds (HQ = hq - 1, hq, hq + 1)
    expected = {c: sum(abs(hq + d - 85.6) for d in (-1, 0, 1)) / 3 + abs(modes - 100) for c, (hq, modes) in gan.items()}
    expected["slowk"] = expected["base"]
    assert distances == pytest.approx(expected)
    assert chosen == "betas"
    # a top-k row, however good, never changes the decision
    for seed in (1, 2, 3):
        fake_run(tmp_path, "depth4", "topk", seed, 99, 100)
    assert sweep.decide(tmp_path, [1, 2, 3], ITER)[0] == "betas"


def test_decision_waits_for_every_gan_cell(tmp_path):
    for config in ("base", "spacing1", "depth4", "betas"):
        for seed in (1, 2):
            fake_run(tmp_path, config, "gan", seed, 90, 90)
    chosen, distances = sweep.decide(tmp_path, [1, 2], ITER)
    assert chosen is None and distances["all"] is None
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "mog_table1.py"), "--config", "chosen", "--seeds",
                           "1", "2", "--out-dir", str(tmp_path), "--report-only"], capture_output=True, text=True)
    assert proc.returncode == 2 and "missing: all" in assert_one_line_error(proc)


def test_holm_adjusts_by_rank_monotonically_and_caps_at_one():
    assert sweep.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert sweep.holm({"x": 0.6, "y": 0.5}) == {"x": 1.0, "y": 1.0}
    assert sweep.holm({"only": 0.02}) == {"only": 0.02}


def test_welch_matches_scipy_and_handles_constant_rows():
    a, b = [68.0, 63.6, 70.8], [93.2, 92.0, 94.1]
    assert float(sweep.welch(a, b)) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, abs=5e-4)
    assert sweep.welch([100.0, 100.0], [100.0, 100.0]) == "1.000"
    tiny = stats.ttest_ind([94.6, 93.9, 93.6], [85.5, 85.0, 85.2], equal_var=False).pvalue  # ~2e-4: not "0.000"
    assert float(sweep.welch([94.6, 93.9, 93.6], [85.5, 85.0, 85.2])) == pytest.approx(tiny, rel=0.05)
    assert sweep.welch([1.0], [2.0, 3.0]) == "–"


def test_study_report_and_picture(tmp_path):
    rows = {("base", "gan"): [(93, 70), (92, 75)], ("base", "topk"): [(70, 95), (66, 90)],
            ("spacing1", "gan"): [(97, 84), (96, 88)], ("spacing1", "topk"): [(91, 100), (92, 100)]}
    for (config, variant), values in rows.items():
        for seed, (hq, modes) in enumerate(values, start=1):
            fake_run(tmp_path, config, variant, seed, hq, modes, rkl=0.1 * seed if variant == "topk" else 0.5 + 0.1 * seed)
    text = sweep.study_report(tmp_path, [1, 2], ITER)
    assert "| base | `--setup base` | gan | 2 | 92.5 ± 0.7 | 72.5 ± 3.5 |" in text
    assert "| slowk | `--setup base` | gan (= base) | 2 | 92.5 ± 0.7 |" in text
    assert "| spacing1 | `--setup spacing1` | topk | 2 | 91.5 ± 0.7 | 100.0 ± 0.0 |" in text
    assert "| 70.0, 66.0 | 95.0, 90.0 | 0.100, 0.200 |" in text  # base top-k per seed: HQ, modes, reverse KL
    p = stats.ttest_ind([70, 66], [93, 92], equal_var=False).pvalue
    p_modes = stats.ttest_ind([95, 90], [70, 75], equal_var=False).pvalue
    p_rkl = stats.ttest_ind([0.1, 0.2], [0.6, 0.7], equal_var=False).pvalue
    assert f"| base | -24.5 | {p:.3f} | +20.0 | {p_modes:.3f} | -0.500 | {p_rkl:.3f} |" in text
    assert "Chosen: – (GAN cells of the study still missing)" in text
    # across configs: both configs with runs have top-k below the GAN in HQ and above it in modes
    assert "- HQ: top-k higher in 0, lower in 2 of 2 (sign test p = 0.500)" in text
    assert "- modes: top-k higher in 2, lower in 0 of 2 (sign test p = 0.500)" in text
    assert "Holm-Bonferroni over the 6 Welch tests above" in text
    assert (tmp_path / "study.md").read_text() == text
    with Image.open(tmp_path / "study.png") as img:
        assert img.format == "PNG" and img.size == (900, 680)
        # the spacing1 colour appears (its markers and arrow were drawn)
        colours = {colour for _, colour in img.convert("RGB").getcolors(maxcolors=1 << 20)}
        assert sweep.COLOURS["spacing1"] in colours


def test_table1_report_has_per_seed_values_and_welch_against_the_gan_row(tmp_path):
    for seed, (g, t) in enumerate([((96, 100), (92, 100)), ((95, 96), (90, 100)), ((97, 100), (91, 100))], start=1):
        fake_run(tmp_path, "all", "gan", seed, *g, rkl=0.5 + 0.01 * seed)
        fake_run(tmp_path, "all", "topk", seed, *t, rkl=0.1 * seed)
    fake_run(tmp_path, "all", "bottomk", 2, 99, 50)  # one seed: a difference but no test
    text = sweep.report(tmp_path, "all", [25], ["gan", "topk", "bottomk"], [1, 2, 3], ITER)
    assert "| 25 | topk | 3 (seeds 1,2,3) | 91.0 ± 1.0 (92.0, 90.0, 91.0) | 95.5 | 100.0 ± 0.0 (100.0, 100.0, 100.0) |" in text
    p_hq = stats.ttest_ind([92, 90, 91], [96, 95, 97], equal_var=False).pvalue
    p_rkl = stats.ttest_ind([0.1, 0.2, 0.3], [0.51, 0.52, 0.53], equal_var=False).pvalue
    assert f"| 25 | topk | -5.0 | {p_hq:.3f} | +1.3 | " in text and f"| -0.320 | {p_rkl:.3f} |" in text
    # bottom-k is compared with the GAN run of its own seed only (seed 2: HQ 99 vs 95, modes 50 vs 96)
    assert "| 25 | bottomk | +4.0 | – | -46.0 | – | -0.020 | – |" in text
    assert (tmp_path / "all" / "table1.md").read_text() == text


def test_table1_seconds_per_run_count_the_whole_of_a_resumed_run(tmp_path):
    """s/run is a run's iterations at its measured rate: a run resumed at 40k after a stop (its last process timed
    200 s at 50 it/s) counts as 1000 s like an uninterrupted one, not as the 200 s of its last process."""
    fake_run(tmp_path, "all", "gan", 1, 96, 100, it_per_s=50.0)
    fake_run(tmp_path, "all", "gan", 2, 95, 100, resumed_from_step=40000, it_per_s=50.0)
    fake_run(tmp_path, "all", "topk", 1, 92, 100, it_per_s=25.0)
    text = sweep.report(tmp_path, "all", [25], ["gan", "topk"], [1, 2], ITER)
    assert "| 25 | gan | 2 (seeds 1,2) |" in text and "| 1000 |" in text and "| 2000 |" in text


def test_one_real_cell_gets_its_config_flags_and_one_thread(tmp_path):
    from test_presets import run  # the preset in this process, its run as a process

    proc = run(REPO / "sweeps" / "mog_table1.py", "--config", "all", "--modes", "4", "--variants", "topk", "--seeds", "1",
               "--iterations", "20", "--jobs", "2", "--cores", "2", "--no-keep-checkpoints", "--out-dir", tmp_path,
               "--extra", "--hidden-dim", "8", "--batch-size", "16", "--eval-samples", "100", "--eval-every", "10",
               "--log-every", "10", "--mu", "12")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = list((tmp_path / "all").glob("mog4_topk__1__*"))
    assert len(runs) == 1
    args = json.loads((runs[0] / "args.json").read_text())
    assert (args["grid_spacing"], args["hidden_layers"], args["beta1"], args["beta2"]) == (1.0, 4, 0.9, 0.99)
    assert args["iters_per_epoch"] == 2000 and args["threads"] == 1 and args["topk"] is True
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["step"] == 20 and summary["threads"] == 1 and math.isfinite(summary["reverse_kl"])
    assert "| 4 | topk | 1 (seeds 1) |" in (tmp_path / "all" / "table1.md").read_text()
