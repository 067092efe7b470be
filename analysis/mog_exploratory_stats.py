"""Statistics of the exploratory MoG results (Table 1 and Figure 2 in the chosen setup) and of the MNIST 5k table.

Reads only committed files and writes `<out>/exploratory.md` (printed too):
  1. Table 1 in the chosen setup (`<study>/all`, seeds 1-3): the 9 top-k-vs-GAN tests (25 / 64 / 100 modes x HQ,
     modes, reverse KL), two-sided Welch p and the Holm-adjusted p over the 9, recomputed from summary.json; and the
     two numbers the README's prose rounds differently (100-mode top-k minus bottom-k modes; 100-mode top-k HQ p).
  2. Figure 2 at the run level (`--figure2`, the JSON files of analysis/mog_update_direction.py): the unit is the
     training run (6 runs, 2 checkpoints each). Per checkpoint d = mean cosine of the top-k step minus that of the
     bottom-k step over all samples (`mean_cos_all`); per run the mean of its two d. Sign test over the 6 run
     means, one-sample t-test of the 6 run means against 0, Wilcoxon signed-rank test over the 12 checkpoint d
     (which treats a run's two checkpoints as independent). The per-checkpoint table is description.
  3. MNIST 5k table (`--mnist`): test errors per seed of the K+1 GAN and of the supervised-only baseline; both arms
     of a seed use the same labels (seed = --seed = --seed-data), so the paired t-test over seeds is the test; the
     Welch test beside it for comparison.
  4. HQ of the 25-mode runs of every setup folder of the study: the final value against the mean of the
     evaluations at 40k-50k and 30k-50k (metrics.jsonl), beside the paper's 85.6 % (GAN) and 95.5 % (top-k).
  5. The 64- and 100-mode runs of Table 1: HQ % at every evaluation, the first iteration from which top-k is ahead
     of the GAN of the same seed at every later evaluation, and the 100-mode lock-in (modes >= 95 %).

Usage:
    python analysis/mog_exploratory_stats.py
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mog_stats as ms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEEDS = (1, 2, 3)
ITER = 50000
PAPER_HQ_25 = {"gan": 85.6, "topk": 95.5}
METRIC_NAMES = {"hq": "HQ %", "modes": "modes %", "rkl": "reverse KL"}
ARM_NAME = {"gan": "GAN", "topk": "top-k", "bottomk": "bottom-k"}
EVAL_STEPS = tuple(range(5000, ITER + 1, 5000))
LOCK_IN = 95.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", default="results/mog/study", help="the setup study's folder (one subfolder per setup)")
    p.add_argument("--figure2", default="results/mog/study/figure2", help="JSON files of mog_update_direction.py")
    p.add_argument("--mnist", default="results/mnist5k/table.md", help="the MNIST 5k table")
    p.add_argument("--out", default="results/mog/reports", help="folder of exploratory.md")
    return p.parse_args(argv)


def resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def finished(runs, modes, variant) -> list[ms.Run]:
    """The finished runs of one cell, seeds 1-3 in order."""
    out = [ms.pick(runs, modes, variant, s, ITER) for s in SEEDS]
    return [r for r in out if r is not None and r.finished]


def p4(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


# ---------------------------------------------------------------------------------------------------------------
def table1_section(study: Path) -> list[str]:
    runs = ms.read_runs(study / "all")
    lines = ["## 1. Table 1 in the chosen setup: Holm over the 9 top-k-vs-GAN tests", "",
             f"Runs: `{rel(study / 'all')}`, 50,000 iterations, seeds 1–3, final values from summary.json. Two-sided "
             "Welch t-test over seeds, top-k minus GAN; Holm–Bonferroni over the 9 tests (3 grids × 3 metrics).", "",
             "| modes | metric | GAN mean | top-k mean | top-k − GAN | Welch p | Holm p |", "|---|---|---|---|---|---|---|"]
    tests = {}
    for modes in (25, 64, 100):
        gan, topk = finished(runs, modes, "gan"), finished(runs, modes, "topk")
        if len(gan) < 2 or len(topk) < 2:
            continue
        for key in ("hq", "modes", "rkl"):
            tests[(modes, key)] = ms.welch([r.final(key) for r in topk], [r.final(key) for r in gan])
    adjusted = ms.holm({k: t.p for k, t in tests.items()})
    for (modes, key), t in tests.items():
        d = 3 if key == "rkl" else 2
        lines.append(f"| {modes} | {METRIC_NAMES[key]} | {t.mean_b:.{d}f} | {t.mean_a:.{d}f} | {t.diff:+.{d}f} "
                     f"| {p4(t.p)} | {p4(adjusted[(modes, key)])} |")
    n_sig = sum(p < 0.05 for p in adjusted.values())
    smallest = min(adjusted.values()) if adjusted else float("nan")
    lines += ["", f"Tests with Holm p < 0.05: {n_sig} of {len(tests)} (smallest Holm p {p4(smallest)}).", ""]

    topk100, bottom100 = finished(runs, 100, "topk"), finished(runs, 100, "bottomk")
    if (100, "hq") in tests:
        lines.append(f"- 100 modes, top-k against GAN, HQ: Welch p = {tests[(100, 'hq')].p:.4f} "
                     f"(to two digits {tests[(100, 'hq')].p:.2f}).")
    if topk100 and bottom100:
        mt = float(np.mean([r.final("modes") for r in topk100]))
        mb = float(np.mean([r.final("modes") for r in bottom100]))
        extra = ""
        if len(topk100) >= 2 and len(bottom100) >= 2:
            w = ms.welch([r.final("modes") for r in topk100], [r.final("modes") for r in bottom100])
            extra = f"; Welch p = {w.p:.3f}"
        lines.append(f"- 100 modes, modes %, top-k minus bottom-k: {mt:.2f} − {mb:.2f} = {mt - mb:.2f}, "
                     f"i.e. {mt - mb:.1f} points{extra}.")
    return lines + [""]


# ---------------------------------------------------------------------------------------------------------------
def figure2_section(folder: Path) -> list[str]:
    records = []
    for path in sorted(folder.glob("*.json")):
        d = json.loads(path.read_text())
        if "topk" not in d or "bottomk" not in d or d.get("optimizer", "sgd") != "sgd":
            continue
        records.append(d)
    lines = ["## 2. Figure 2 at the run level", "",
             f"Files: `{rel(folder)}/*.json` (one checkpoint each, one SGD step). d = mean cosine towards the nearest "
             "mode over all samples, top-k step minus bottom-k step (d < 0: the bottom-k step is ahead). The paired "
             "p over the 10,000 samples of one checkpoint is description only: every sample shares one weight "
             "change.", "",
             "| run | iteration | top-k step | bottom-k step | d | paired p over samples |", "|---|---|---|---|---|---|"]
    per_run: dict[str, list[float]] = {}
    for d in sorted(records, key=lambda r: (r["run"], r["step"])):
        diff = d["topk"]["mean_cos_all"] - d["bottomk"]["mean_cos_all"]
        per_run.setdefault(d["run"], []).append(diff)
        lines.append(f"| {d['run']} | {d['step']} | {d['topk']['mean_cos_all']:+.3f} | {d['bottomk']['mean_cos_all']:+.3f} "
                     f"| {diff:+.3f} | {ms.fmt_p(d.get('paired_p_all'))} |")
    if len(per_run) < 2:
        return lines + ["", "Fewer than 2 runs: no run-level test.", ""]
    means = np.array([np.mean(v) for v in per_run.values()])
    checkpoints = np.array([x for v in per_run.values() for x in v])
    pos, neg, p_sign = ms.sign_test(means)
    p_t = float(stats.ttest_1samp(means, 0.0).pvalue)
    wil = stats.wilcoxon(checkpoints)
    lines += ["", "| run | checkpoints | mean d |", "|---|---|---|"]
    lines += [f"| {run} | {len(v)} | {np.mean(v):+.3f} |" for run, v in per_run.items()]
    lines += ["",
              f"- Runs with the bottom-k step ahead (mean d < 0): {neg} of {len(means)}; top-k ahead: {pos}. "
              f"Two-sided sign test p = {p_sign:.4f}.",
              f"- One-sample t-test of the {len(means)} run means against 0: mean d = {means.mean():+.4f}, "
              f"p = {p_t:.4f}.",
              f"- Wilcoxon signed-rank test over the {len(checkpoints)} checkpoints: {int((checkpoints < 0).sum())} "
              f"of {len(checkpoints)} with d < 0, W = {wil.statistic:.0f}, two-sided p = {wil.pvalue:.4f}.",
              "- None is below 0.05: that the paper's direction (top-k step ahead) is not reproduced is supported; "
              "that the bottom-k step is ahead is not shown at the run level."
              if min(p_sign, p_t, wil.pvalue) >= 0.05 else
              "- At least one run-level test is below 0.05.", ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------
def parse_mnist(path: Path) -> dict:
    """{method: {"seeds": [...], "errors": [...]}} from the rows of the MNIST table."""
    rows = [l for l in path.read_text().splitlines() if l.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    col_seeds = header.index("seeds")
    col_err = next(i for i, h in enumerate(header) if h.startswith("test errors"))
    out = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        out[cells[1]] = {"seeds": [int(x) for x in re.findall(r"\d+", cells[col_seeds])],
                         "errors": [int(x) for x in re.findall(r"\d+", cells[col_err])]}
    return out


def mnist_section(path: Path) -> list[str]:
    lines = ["## 3. MNIST 5k table: paired test over seeds", ""]
    if not path.is_file():
        return lines + [f"`{rel(path)}` not found.", ""]
    table = parse_mnist(path)
    ssl = next(v for k, v in table.items() if k.startswith("SSL"))
    sup = next(v for k, v in table.items() if k.startswith("supervised"))
    assert ssl["seeds"] == sup["seeds"], "the two rows have different seeds"
    diffs = [b - a for a, b in zip(ssl["errors"], sup["errors"])]
    paired = stats.ttest_rel(sup["errors"], ssl["errors"])
    w = ms.welch(sup["errors"], ssl["errors"])
    lines += [f"From `{rel(path)}` (test errors of 1,000, EMA D; seeds {', '.join(map(str, ssl['seeds']))}; both arms of "
              "a seed use the same labels).", "",
              "| seed | SSL (K+1 GAN) | supervised-only | supervised − SSL |", "|---|---|---|---|"]
    lines += [f"| {s} | {a} | {b} | {b - a:+d} |" for s, a, b in zip(ssl["seeds"], ssl["errors"], sup["errors"])]
    lines += ["", f"- Paired t-test over seeds: mean difference {np.mean(diffs):.1f} errors "
              f"(sample std {np.std(diffs, ddof=1):.1f}), t = {paired.statistic:.2f}, df = {len(diffs) - 1}, "
              f"two-sided p = {paired.pvalue:.4f}.",
              f"- Welch t-test (unpaired, for comparison): p = {w.p:.4f}, 95 % CI of the difference "
              f"[{w.low:+.1f}, {w.high:+.1f}].", ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------
def hq_section(study: Path) -> list[str]:
    order = ["all", "base", "spacing1", "depth4", "slowk", "betas"]
    setups = [s for s in order if (study / s).is_dir()] + \
        sorted(p.name for p in study.iterdir() if p.is_dir() and p.name not in order and ms.read_runs(p))
    lines = ["## 4. The 25-mode GAN's HQ: final value against the mean of the last evaluations", "",
             "Mean over seeds 1–3 (per-seed values in brackets) of HQ % at 50k (final), of the mean of the "
             "evaluations at 40k, 45k, 50k, and of the mean of those at 30k–50k (metrics.jsonl). Paper: GAN 85.6 %, "
             "top-k 95.5 %. slowk's GAN run is base's.", "",
             "| setup | variant | final | mean 40k–50k | mean 30k–50k | paper |", "|---|---|---|---|---|---|"]
    gan_summary = {}
    for setup in setups:
        runs = ms.read_runs(study / setup)
        for variant in ("gan", "topk"):
            done = finished(runs, 25, variant)
            if not done:
                continue
            cols = []
            vals = {}
            for name, steps in (("final", (ITER,)), ("40", (40000, 45000, 50000)),
                                ("30", (30000, 35000, 40000, 45000, 50000))):
                v = [r.mean_at(steps, "hq") for r in done]
                v = [x for x in v if x is not None]
                vals[name] = v
                cols.append(f"{np.mean(v):.1f} ({', '.join(f'{x:.1f}' for x in v)})" if v else "–")
            if variant == "gan":
                gan_summary[setup] = {k: float(np.mean(v)) for k, v in vals.items() if v}
            lines.append(f"| {setup} | {ARM_NAME[variant]} | " + " | ".join(cols) + f" | {PAPER_HQ_25[variant]} |")
    lines.append("")
    if gan_summary:
        shift = [g["40"] - g["final"] for g in gan_summary.values() if "40" in g]
        low40 = min(g["40"] for g in gan_summary.values())
        high40 = max(g["40"] for g in gan_summary.values())
        low30 = min(g["30"] for g in gan_summary.values())
        lines += [f"Averaging over the last three evaluations changes the GAN's mean HQ by {min(shift):+.1f} to "
                  f"{max(shift):+.1f} points across the {len(gan_summary)} setups with a GAN row; it stays at "
                  f"{low40:.1f}–{high40:.1f} % (lowest 30k–50k mean: {low30:.1f} %), against the paper's 85.6 %. "
                  + ("So the late-training average does not bring the GAN near the paper's value. "
                     if low30 > PAPER_HQ_25["gan"] + 2 else "")
                  + "The candidates left, none of them run here: the latent dimension (2 here), the learning rate "
                  "(1e-4 for G and D here) and the D:G update ratio (one D step per G step here). The paper states "
                  "none of the three.", ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------
def convergence_note(study: Path) -> list[str]:
    runs = ms.read_runs(study / "all")
    head = "| modes | variant | seed | " + " | ".join(f"{s // 1000}k" for s in EVAL_STEPS) + " |"
    sep = "|---|---|---|" + "---|" * len(EVAL_STEPS)
    lines = ["## 5. 64 and 100 modes: HQ at every evaluation", "",
             f"Runs: `{rel(study / 'all')}` (Table 1, seeds 1–3). HQ % at each 5k evaluation (metrics.jsonl).", "",
             head, sep]
    for modes in (64, 100):
        for variant in ("gan", "topk"):
            for r in finished(runs, modes, variant):
                lines.append(f"| {modes} | {ARM_NAME[variant]} | {r.seed} | "
                             + " | ".join("–" if r.at(s, "hq") is None else f"{r.at(s, 'hq'):.1f}" for s in EVAL_STEPS) + " |")
    lines.append("")
    for modes in (64, 100):
        gan = {r.seed: r for r in finished(runs, modes, "gan")}
        topk = {r.seed: r for r in finished(runs, modes, "topk")}
        parts = []
        for seed in sorted(set(gan) & set(topk)):
            ahead = [topk[seed].at(s, "hq") > gan[seed].at(s, "hq") for s in EVAL_STEPS]
            start = next((EVAL_STEPS[i] for i in range(len(ahead)) if all(ahead[i:])), None)
            parts.append(f"seed {seed}: " + (f"{start // 1000}k" if start else "not ahead at 50k"))
        rising = [(ARM_NAME[r.variant], r.seed, r.at(50000, "hq") - r.at(35000, "hq"))
                  for v in ("gan", "topk") for r in finished(runs, modes, v)]
        lines.append(f"- {modes} modes, first evaluation from which top-k's HQ stays above the GAN's of the same "
                     "seed through 50k: " + "; ".join(parts) + ". HQ change from 35k to 50k: "
                     + ", ".join(f"{a} seed {s} {d:+.1f}" for a, s, d in rising) + " points.")
    lines += ["", "100 modes, modes % at every evaluation, and lock-in (≥ 95 % of the modes at 50k):", "", head, sep]
    for variant in ("gan", "topk"):
        for r in finished(runs, 100, variant):
            lines.append(f"| 100 | {ARM_NAME[variant]} | {r.seed} | "
                         + " | ".join("–" if r.at(s, "modes") is None else f"{r.at(s, 'modes'):.0f}" for s in EVAL_STEPS) + " |")
    lines.append("")
    for variant in ("gan", "topk"):
        done = finished(runs, 100, variant)
        locked = [r for r in done if r.final("modes") >= LOCK_IN]
        rest = [r for r in done if r.final("modes") < LOCK_IN]
        desc = lambda rs: ", ".join(f"seed {r.seed} ({r.final('modes'):.0f} % modes, {r.final('hq'):.1f} % HQ)" for r in rs) or "none"
        lines.append(f"- {ARM_NAME[variant]}: {len(locked)} of {len(done)} lock in: {desc(locked)}; not: {desc(rest)}.")
    return lines + [""]


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = resolve(args.out)
    command = "python analysis/mog_exploratory_stats.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    study = resolve(args.study)
    lines = ["# MoG Table 1 / Figure 2 and MNIST 5k: statistics of the exploratory results", "",
             f"Made by `{command}` from the committed files; every number below comes from that command.", ""]
    lines += table1_section(study)
    lines += figure2_section(resolve(args.figure2))
    lines += mnist_section(resolve(args.mnist))
    lines += hq_section(study)
    lines += convergence_note(study)
    ms.write_report(lines, out / "exploratory.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
