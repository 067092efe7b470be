"""The MoG reports of analysis/: the statistics of analysis/mog_stats.py against independent computations (scipy,
hand-worked Holm, brute-force enumeration), and analysis/mog_confirm.py on small synthetic run folders: matching by
args.json, the interim rule (no primary test before 12 + 12 finished runs), the convergence arm's verdict and its
check against the committed 50k runs; analysis/mog_exploratory_stats.py's MNIST and Figure 2 parts."""

import itertools
import json
import math
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from conftest import REPO

sys.path.insert(0, str(REPO / "analysis"))
import mog_confirm  # noqa: E402
import mog_exploratory_stats as explo  # noqa: E402
import mog_stats as ms  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# Synthetic run folders (what mog_topk.py leaves: args.json, metrics.jsonl, summary.json once finished)
# ---------------------------------------------------------------------------------------------------------------
def write_run(root, variant, seed, *, n_modes=64, iterations=50000, hq=None, modes=None, rkl=None, upto=None,
              name=None, **overrides):
    """A run folder. hq / modes / rkl: functions of the step giving the value (percent / percent / nats) of each
    evaluation every 5,000 iterations; `upto`: the last step written (default: the whole run, with summary.json)."""
    hq = hq or (lambda s: 10 + s / 1000)
    modes = modes or (lambda s: 100.0)
    rkl = rkl or (lambda s: 0.5)
    args = dict(mog_confirm.DESIGN, seed=seed, n_modes=n_modes, iterations=iterations, topk=variant != "gan",
                bottomk=variant == "bottomk", **(mog_confirm.DESIGN_TOPK if variant != "gan" else
                                                 {"mu": 128, "iters_per_epoch": 500, "gamma": 0.99}))
    args.update(overrides)
    folder = root / (name or f"mog{n_modes}_{variant}__{seed}__{1796000000 + seed}")
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(args))
    last = iterations if upto is None else upto
    lines = []
    for step in range(0, last + 1, 500):
        if step:
            lines.append({"step": step, "loss_d": 1.0, "loss_g": 1.0})
        if step % 5000 == 0:
            lines.append({"step": step, "eval/high_quality": hq(step) / 100, "eval/modes_recovered": modes(step) / 100,
                          "eval/reverse_kl": rkl(step)})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    if upto is None:
        (folder / "summary.json").write_text(json.dumps(
            {"step": iterations, "seed": seed, "high_quality": hq(iterations) / 100,
             "modes_recovered": modes(iterations) / 100, "reverse_kl": rkl(iterations), "n_modes": n_modes}))
    return folder


def final_hq(variant, seed):
    """Distinct final HQ values per run (two decimals, so a leak into the report would be visible)."""
    return (60.0 if variant == "gan" else 70.0) + 1.37 * seed + (0.11 if variant == "topk" else 0.0)


def modes_of(variant, seed):
    return 100.0 - (seed % (3 if variant == "gan" else 2)) * 1.5625


def rkl_of(variant, seed):
    return 0.1 * seed + (0.3 if variant == "gan" else 0.0)


def confirm_arm(root, n_gan=12, n_topk=12):
    for variant, n in (("gan", n_gan), ("topk", n_topk)):
        for seed in range(4, 16):
            v = final_hq(variant, seed)
            write_run(root, variant, seed, hq=lambda s, v=v: v - (50000 - s) / 5000,
                      modes=lambda s, m=modes_of(variant, seed): m, rkl=lambda s, r=rkl_of(variant, seed): r,
                      upto=None if seed < 4 + n else 20000)


def run_report(tmp_path, *extra):
    out = tmp_path / "out"
    mog_confirm.main(["--confirm-dir", str(tmp_path / "confirm"), "--convergence-dir", str(tmp_path / "conv"),
                      "--study-dir", str(tmp_path / "study"), "--out", str(out), *extra])
    return (out / "confirm.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
def test_welch_matches_scipy_and_its_interval_inverts_the_test():
    rng = np.random.default_rng(0)
    for na, nb in ((3, 3), (12, 12), (5, 9)):
        a, b = rng.normal(70, 8, na), rng.normal(55, 14, nb)
        w = ms.welch(a, b)
        ref = stats.ttest_ind(a, b, equal_var=False)
        assert w.p == pytest.approx(ref.pvalue, rel=1e-10)
        assert w.t == pytest.approx(ref.statistic, rel=1e-10)
        assert w.diff == pytest.approx(a.mean() - b.mean())
        # the 95 % interval's ends are the shifts at which the Welch test gives p = 0.05
        for end in (w.low, w.high):
            assert stats.ttest_ind(a - end, b, equal_var=False).pvalue == pytest.approx(0.05, abs=1e-9)
        if hasattr(ref, "confidence_interval"):
            lo, hi = ref.confidence_interval(0.95)
            assert (w.low, w.high) == pytest.approx((lo, hi), rel=1e-9)


def test_welch_without_spread_follows_the_table1_convention():
    assert ms.welch([100, 100, 100], [100, 100, 100]).p == 1.0
    w = ms.welch([100, 100], [98, 98])
    assert w.p == 0.0 and w.low == w.high == 2.0
    with pytest.raises(ValueError):
        ms.welch([1.0], [2.0, 3.0])


def test_hedges_g_by_hand():
    a, b = [85.3, 70.5, 77.7], [66.0, 47.4, 37.5]
    sa, sb = np.std(a, ddof=1), np.std(b, ddof=1)
    pooled = math.sqrt((2 * sa ** 2 + 2 * sb ** 2) / 4)
    d = (np.mean(a) - np.mean(b)) / pooled
    assert ms.hedges_g(a, b) == pytest.approx(d * (1 - 3 / (4 * 6 - 9)))


def test_holm_by_hand():
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}
    # sorted: d 0.005*4 = 0.02, a 0.01*3 = 0.03, c 0.03*2 = 0.06, b max(0.06, 0.04*1) = 0.06
    assert ms.holm(p) == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06})
    assert ms.holm({"x": 0.6, "y": 0.9}) == {"x": 1.0, "y": 1.0}


def test_fisher_and_its_exact_power_by_enumeration():
    assert ms.fisher_p(2, 3, 1, 3) == pytest.approx(stats.fisher_exact([[2, 1], [1, 2]]).pvalue)
    assert ms.fisher_p(3, 3, 0, 3) == pytest.approx(0.1)
    n, p1, p2 = 6, 0.9, 0.2
    brute = sum(stats.binom.pmf(x1, n, p1) * stats.binom.pmf(x2, n, p2)
                for x1, x2 in itertools.product(range(n + 1), repeat=2)
                if stats.fisher_exact([[x1, n - x1], [x2, n - x2]]).pvalue <= 0.05)
    assert ms.fisher_power(n, p1, p2) == pytest.approx(brute, abs=1e-12)
    nf = ms.n_fisher(1.0, 0.0)
    assert ms.fisher_power(nf, 1.0, 0.0) >= 0.8 > ms.fisher_power(nf - 1, 1.0, 0.0)
    assert ms.n_fisher(0.5, 0.5) is None


def test_two_proportion_sample_size_is_the_first_n_with_power_08():
    def power(n, p1, p2):  # the z-test's power, normal approximation, pooled variance under H0
        pbar = (p1 + p2) / 2
        z = (abs(p1 - p2) * math.sqrt(n) - 1.959964 * math.sqrt(2 * pbar * (1 - pbar))) / \
            math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
        return stats.norm.cdf(z)
    for p1, p2 in ((2 / 3, 1 / 3), (0.9, 0.5), (1.0, 0.4)):
        n = ms.n_two_proportions(p1, p2)
        assert power(n, p1, p2) >= 0.8 > power(n - 1, p1, p2)
        assert ms.n_two_proportions(p1, p2, continuity=True) >= n
    assert ms.n_two_proportions(0.4, 0.4) is None


def test_sign_test_is_binomtest_without_zeros():
    assert ms.sign_test([-0.1, -0.2, 0.3, -0.4, -0.05, -0.02]) == (1, 5, pytest.approx(stats.binomtest(1, 6).pvalue))
    assert ms.sign_test([0.0, 1.0, 2.0])[:2] == (2, 0)


@pytest.mark.parametrize("d150, verdict", [(10.5, "grows"), (10.0, "holds"), (5.0, "holds"), (4.999, "shrinks"),
                                          (0.001, "shrinks"), (0.0, "closes"), (-3.0, "closes")])
def test_convergence_verdict_at_its_boundaries(d150, verdict):
    assert ms.convergence_verdict(10.0, d150) == verdict


def test_convergence_verdict_needs_a_positive_gap_at_50k():
    assert ms.convergence_verdict(0.0, 5.0) == "undefined"
    assert ms.convergence_verdict(-2.0, -1.0) == "undefined"


# ---------------------------------------------------------------------------------------------------------------
# The confirmatory report
# ---------------------------------------------------------------------------------------------------------------
def test_no_primary_test_and_no_values_before_12_plus_12(tmp_path):
    confirm_arm(tmp_path / "confirm", n_gan=12, n_topk=11)
    text = run_report(tmp_path)
    assert "Finished: GAN 12 of 12, top-k 11 of 12" in text
    assert "not yet computed" in text
    assert "Primary endpoint" not in text and "Welch" not in text.split("## Convergence")[0]
    assert "unfinished (last record at iteration 20,000 of 50,000)" in text
    for variant in ("gan", "topk"):  # no metric value of any confirmatory run leaks into the report
        for seed in range(4, 16):
            assert f"{final_hq(variant, seed):.2f}" not in text


def test_primary_and_secondaries_once_complete(tmp_path):
    confirm_arm(tmp_path / "confirm")
    text = run_report(tmp_path)
    gan = [final_hq("gan", s) for s in range(4, 16)]
    topk = [final_hq("topk", s) for s in range(4, 16)]
    ref = stats.ttest_ind(topk, gan, equal_var=False)
    primary = next(l for l in text.splitlines() if l.startswith("| final HQ %"))
    assert f"| {ms.fmt_p(ref.pvalue)} |" in primary
    assert f"{np.mean(topk) - np.mean(gan):+.2f} [" in primary
    assert f"{ms.hedges_g(topk, gan):+.2f}" in primary
    # secondaries: p from scipy, Holm by hand over the three
    late = lambda v: [np.mean([x - (50000 - s) / 5000 for s in (40000, 45000, 50000)]) for x in v]
    modes = {v: [modes_of(v, s) for s in range(4, 16)] for v in ("topk", "gan")}
    rkl = {v: [rkl_of(v, s) for s in range(4, 16)] for v in ("topk", "gan")}
    p = [stats.ttest_ind(late(topk), late(gan), equal_var=False).pvalue,
         stats.ttest_ind(modes["topk"], modes["gan"], equal_var=False).pvalue,
         stats.ttest_ind(rkl["topk"], rkl["gan"], equal_var=False).pvalue]
    order = np.argsort(p)
    holm, running = [0.0] * 3, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * p[i]))
        holm[i] = running
    rows = [l for l in text.splitlines() if l.startswith(("| HQ % (mean", "| modes recovered", "| reverse KL (nats)"))]
    for row, pi, hi in zip(rows, p, holm):
        assert row.endswith(f"| {ms.fmt_p(pi)} | {ms.fmt_p(hi)} |")
    assert f"{final_hq('topk', 4):.2f}" in text  # the per-run table now has the values


def test_runs_are_matched_by_args_json_not_by_folder_name(tmp_path):
    root = tmp_path / "confirm"
    confirm_arm(root)
    # a top-k run of seed 5 whose folder name says GAN seed 9, and the real top-k seed 5 removed
    import shutil
    shutil.rmtree(next(root.glob("mog64_topk__5__*")))
    write_run(root, "topk", 5, name="mog64_gan__9__1796999999", hq=lambda s: final_hq("topk", 5) - (50000 - s) / 5000)
    write_run(root, "gan", 7, n_modes=25, name="mog64_gan__7__1796999998")        # wrong grid: not in the design
    write_run(root, "gan", 3, name="mog64_gan__3__1796999997")                     # seed outside 4-15
    write_run(root, "topk", 6, mu=128, name="mog64_topk__6__1796999996")           # other k schedule
    text = run_report(tmp_path)
    assert "Finished: GAN 12 of 12, top-k 12 of 12" in text
    assert "| top-k | 5 | finished |" in text and "`mog64_gan__9__1796999999` |" in text
    assert "`mog64_gan__7__1796999998`: args differ from the design: n_modes=25" in text
    assert "`mog64_gan__3__1796999997`: seed 3 is not one of the design's" in text
    assert "`mog64_topk__6__1796999996`: args differ from the design: mu=128" in text


def test_a_summary_with_another_step_is_not_finished(tmp_path):
    root = tmp_path / "confirm"
    confirm_arm(root)
    summary = next(root.glob("mog64_gan__4__*")) / "summary.json"
    summary.write_text(json.dumps(dict(json.loads(summary.read_text()), step=30000)))
    text = run_report(tmp_path)
    assert "Finished: GAN 11 of 12" in text and "not yet computed" in text


def test_sweep_ended_lists_cut_short_runs_and_tests_the_rest(tmp_path):
    confirm_arm(tmp_path / "confirm", n_gan=11, n_topk=12)
    text = run_report(tmp_path, "--sweep-ended")
    assert "| GAN | 15 | cut short: unfinished" in text
    gan = [final_hq("gan", s) for s in range(4, 15)]
    topk = [final_hq("topk", s) for s in range(4, 16)]
    primary = next(l for l in text.splitlines() if l.startswith("| final HQ %"))
    assert "(11)" in primary and "(12)" in primary
    assert f"| {ms.fmt_p(stats.ttest_ind(topk, gan, equal_var=False).pvalue)} |" in primary


def test_convergence_arm_verdict_check_and_plot(tmp_path):
    conv, study = tmp_path / "conv", tmp_path / "study"
    # GAN catches up after 50k: gap 20 at 50k, 8 at 150k -> shrinks (8 < 20 / 2)
    gan = lambda seed: (lambda s: min(50.0 + seed + (s - 50000) / 1000 * 0.12, 99.0) if s > 50000 else 30.0 + seed + s / 2500)
    topk = lambda seed: (lambda s: 70.0 + seed + (s - 50000) / 1000 * 0.0 if s > 50000 else 50.0 + seed + s / 2500)
    for seed in (1, 2, 3):
        write_run(conv, "gan", seed, iterations=150000, hq=gan(seed))
        write_run(conv, "topk", seed, iterations=150000, hq=topk(seed))
        write_run(study, "gan", seed, hq=gan(seed))
        write_run(study, "topk", seed, hq=(topk(seed) if seed != 2 else lambda s: 50.0 + 2 + s / 2500 + (s >= 45000)))
    text = run_report(tmp_path)
    d50 = np.mean([topk(s)(50000) for s in (1, 2, 3)]) - np.mean([gan(s)(50000) for s in (1, 2, 3)])
    d150 = np.mean([topk(s)(150000) for s in (1, 2, 3)]) - np.mean([gan(s)(150000) for s in (1, 2, 3)])
    assert f"Δ(50k) = {d50:+.2f} points." in text and f"Δ(150k) = {d150:+.2f} points." in text
    assert f"**Verdict: the gap {ms.convergence_verdict(d50, d150)}.**" in text and "shrinks" in text
    assert "| GAN | 1 | `mog64_gan__1__1796000001` | 10 of 10 |" in text
    assert "| top-k | 2 | `mog64_topk__2__1796000002` | 10 of 10 | 1 / 0 / 0 | differs from iteration 45,000 |" in text
    assert text.count("| equal |") == 5
    with Image.open(tmp_path / "out" / "convergence.png") as im:
        assert im.size == (900, 700)


def test_convergence_in_progress_gives_no_verdict(tmp_path):
    write_run(tmp_path / "conv", "gan", 1, iterations=150000, upto=60000)
    text = run_report(tmp_path)
    assert "Verdict: not yet" in text and "unfinished (last record at iteration 60,000 of 150,000)" in text
    assert "| 60,000 | 70.0 [70.0, 70.0] (1) | – | – |" in text


def test_lockin_table_and_fisher(tmp_path):
    study = tmp_path / "study"
    for seed, m in zip((1, 2, 3), (100.0, 96.0, 99.0)):
        write_run(study, "topk", seed, n_modes=100, modes=lambda s, m=m: m)
    for seed, m in zip((1, 2, 3), (49.0, 100.0, 43.0)):
        write_run(study, "gan", seed, n_modes=100, modes=lambda s, m=m: m)
    text = run_report(tmp_path)
    assert "Lock-in rate: top-k 3 of 3, GAN 1 of 3; two-sided Fisher exact p = " \
           f"{stats.fisher_exact([[3, 0], [1, 2]]).pvalue:.3f}." in text
    assert f"needs {ms.n_two_proportions(1.0, 1 / 3)} runs per arm" in text


# ---------------------------------------------------------------------------------------------------------------
# The exploratory report
# ---------------------------------------------------------------------------------------------------------------
def test_mnist_paired_and_welch(tmp_path):
    table = tmp_path / "table.md"
    table.write_text(
        "| labels | method | runs (--exp-name) | epochs | seeds | test errors (EMA D), per seed | x |\n|---|---|---|---|---|---|---|\n"
        "| 100 | SSL (K+1 GAN) | a | 60 | 1, 2, 3 | 144, 196, 182 | . |\n"
        "| 100 | supervised-only | b | 60 | 1, 2, 3 | 197, 229, 240 | . |\n")
    text = "\n".join(explo.mnist_section(table))
    assert f"p = {stats.ttest_rel([197, 229, 240], [144, 196, 182]).pvalue:.4f}" in text
    assert f"p = {stats.ttest_ind([197, 229, 240], [144, 196, 182], equal_var=False).pvalue:.4f}" in text
    assert "| 2 | 196 | 229 | +33 |" in text


def test_figure2_run_level(tmp_path):
    diffs = {"r1": (-0.1, -0.2), "r2": (0.05, 0.01), "r3": (-0.3, -0.02)}
    for run, ds in diffs.items():
        for step, d in zip((15000, 20000), ds):
            (tmp_path / f"{run}_{step}.json").write_text(json.dumps(
                {"run": run, "step": step, "optimizer": "sgd", "paired_p_all": 0.5,
                 "topk": {"mean_cos_all": 0.3 + d}, "bottomk": {"mean_cos_all": 0.3}}))
    text = "\n".join(explo.figure2_section(tmp_path))
    means = [np.mean(v) for v in diffs.values()]
    assert f"sign test p = {stats.binomtest(1, 3).pvalue:.4f}" in text
    assert f"p = {stats.ttest_1samp(means, 0).pvalue:.4f}" in text
    assert f"two-sided p = {stats.wilcoxon([x for v in diffs.values() for x in v]).pvalue:.4f}" in text
