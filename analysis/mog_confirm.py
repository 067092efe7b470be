"""Report of the pre-registered 64-mode confirmatory study (docs/mog_study.md, top section).

Reads only run folders and writes `<out>/confirm.md` (printed too) and `<out>/convergence.png`:

  * Confirmatory arm (`--confirm-dir`, default results/mog/confirm/all): setup `all`, 64 modes, 50,000 iterations,
    GAN (mog64_gan) against top-k (mog64_topk), seeds 4-15, 12 runs a side. A run belongs to a cell (arm, seed) by
    its args.json (seed, --topk, --bottomk, --n-modes, --iterations and the setup's values), not by its folder
    name; a run is finished when its summary.json has step == --iterations.
    - Primary endpoint: final HQ %, top-k minus GAN, two-sided Welch t-test, alpha 0.05, with the difference of
      means, its 95 % Welch confidence interval and Hedges' g.
    - Secondary endpoints, Holm-corrected together (family of 3): HQ % averaged over the evaluations at 40k, 45k
      and 50k; modes recovered %; reverse KL. Each with its difference and 95 % CI.
    - Interim rule: until all 12 + 12 runs are finished the report shows only how many runs per arm are finished
      and each run's status (finished / last logged iteration / no folder). It shows no metric value of any
      confirmatory run, no arm mean and no test, so that nothing about the result can be seen before the
      pre-registered sample is complete. `--sweep-ended` declares that the sweep has ended for good (its command
      has exited and will not be run again); only then are unfinished runs treated as cut short: they are listed
      as such, left out, and the tests run on the finished runs. Never pass it while runs can still finish.
  * Convergence arm (`--convergence-dir`, default results/mog/convergence/all; descriptive, no test): seeds 1-3,
    GAN and top-k, 150,000 iterations. HQ % and modes % against iteration, mean and min-max band per arm (over
    the runs that have reached the iteration; n is shown); Delta(t) = top-k minus GAN mean HQ at t over seeds 1-3,
    and the pre-registered verdict on Delta(50k) and Delta(150k) (analysis/mog_stats.py, convergence_verdict),
    given once all six runs are finished. The check that each run repeats the committed 50k run of the same seed
    and arm (`--study-dir`, results/mog/study/all) at every evaluation from 5k to 50k.
  * 100 modes (committed runs of `--study-dir`, seeds 1-3): lock-in rate (runs with >= 95 % of the modes) per
    arm, two-sided Fisher exact test, and the runs per arm a two-proportion z-test (alpha 0.05, power 0.8) needs
    for the observed rates.

Usage:
    python analysis/mog_confirm.py
    python analysis/mog_confirm.py --sweep-ended      # only once the confirmatory sweep has ended for good
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mog_stats as ms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = 64
ARMS = ("gan", "topk")
ARM_NAME = {"gan": "GAN", "topk": "top-k"}
CONFIRM_SEEDS = tuple(range(4, 16))
CONFIRM_ITER = 50000
CONVERGENCE_SEEDS = (1, 2, 3)
CONVERGENCE_ITER = 150000
LATE_STEPS = (40000, 45000, 50000)
LOCK_IN = 95.0
# The design every run must have (setup `all`, docs/mog_study.md); top-k's k schedule in addition.
DESIGN = {"setup": "all", "grid_spacing": 1.0, "hidden_layers": 4, "beta1": 0.9, "beta2": 0.99, "batch_size": 256,
          "latent_dim": 2, "hidden_dim": 256, "lr_g": 1e-4, "lr_d": 1e-4, "std": 0.05, "eval_samples": 10000,
          "feature_matching": False, "minibatch_disc": False, "vbn": False, "hist_avg": 0.0, "label_smoothing": 0.0}
DESIGN_TOPK = {"mu": 192, "iters_per_epoch": 2000, "gamma": 0.99}
COLOURS = {"gan": (214, 39, 40), "topk": (31, 119, 180)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--confirm-dir", default="results/mog/confirm/all", help="run folders of the confirmatory arm")
    p.add_argument("--convergence-dir", default="results/mog/convergence/all",
                   help="run folders of the 150k convergence arm")
    p.add_argument("--study-dir", default="results/mog/study/all",
                   help="committed Table 1 runs (50k, seeds 1-3): the 50k check and the 100-mode lock-in")
    p.add_argument("--out", default="results/mog/reports", help="folder of confirm.md and convergence.png")
    p.add_argument("--sweep-ended", action="store_true",
                   help="the confirmatory sweep has ended for good: unfinished runs count as cut short")
    return p.parse_args(argv)


def resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def design_mismatch(run: ms.Run, iterations: int) -> list[str]:
    """The design values (and --iterations, --n-modes) in which a run's args.json differs from the study's."""
    want = dict(DESIGN, n_modes=MODES, iterations=iterations, **(DESIGN_TOPK if run.variant == "topk" else {}))
    return [f"{k}={run.args.get(k)!r}" for k, v in want.items() if run.args.get(k) != v]


def cells(runs: list[ms.Run], seeds, iterations: int):
    """({(arm, seed): Run or None}, [(run, why it is not part of the design)])."""
    table, other = {}, []
    usable = []
    for run in runs:
        if run.variant not in ARMS:
            other.append((run, f"variant {run.variant}"))
        elif run.seed not in seeds:
            other.append((run, f"seed {run.seed} is not one of the design's"))
        elif design_mismatch(run, iterations):
            other.append((run, "args differ from the design: " + ", ".join(design_mismatch(run, iterations))))
        else:
            usable.append(run)
    for arm in ARMS:
        for seed in seeds:
            table[(arm, seed)] = ms.pick(usable, MODES, arm, seed, iterations)
    chosen = {id(r) for r in table.values() if r is not None}
    other += [(r, "another run of the same cell is used") for r in usable if id(r) not in chosen]
    return table, other


def state(run: ms.Run | None, iterations: int) -> str:
    if run is None:
        return "no run folder"
    if run.finished:
        return "finished"
    return f"unfinished (last record at iteration {run.last_step if run.last_step is not None else 0:,} of {iterations:,})"


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def utc(t: int | None) -> str:
    return "–" if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def ci(w: ms.Welch, digits: int) -> str:
    return f"{w.diff:+.{digits}f} [{w.low:+.{digits}f}, {w.high:+.{digits}f}]"


# ---------------------------------------------------------------------------------------------------------------
# Confirmatory arm
# ---------------------------------------------------------------------------------------------------------------
def confirm_section(confirm_dir: Path, sweep_ended: bool) -> list[str]:
    table, other = cells(ms.read_runs(confirm_dir), CONFIRM_SEEDS, CONFIRM_ITER)
    done = {arm: [table[(arm, s)] for s in CONFIRM_SEEDS if table[(arm, s)] is not None and table[(arm, s)].finished]
            for arm in ARMS}
    complete = all(len(done[a]) == len(CONFIRM_SEEDS) for a in ARMS)
    started = [r.started for r in table.values() if r is not None and r.started is not None]
    lines = ["## Confirmatory arm: 64 modes, 50,000 iterations, seeds 4–15", "",
             f"Run folders: `{rel(confirm_dir)}`. Finished: GAN {len(done['gan'])} of {len(CONFIRM_SEEDS)}, "
             f"top-k {len(done['topk'])} of {len(CONFIRM_SEEDS)}. First run folder created: {utc(min(started) if started else None)}.", ""]
    testable = complete or (sweep_ended and all(len(done[a]) >= 2 for a in ARMS))
    if not complete and not sweep_ended:
        lines += [f"**Primary and secondary tests: not yet computed.** They are computed when all "
                  f"{len(CONFIRM_SEEDS)} + {len(CONFIRM_SEEDS)} pre-registered runs are finished. Until then this "
                  "report shows only the run counts and each run's status, no metric value, arm mean or test.", ""]
    elif not complete and not testable:
        lines += ["**The sweep has ended with fewer than 2 finished runs in an arm: no test can be computed.**", ""]
    elif not complete:
        lines += [f"**The sweep has ended with {len(done['gan'])} + {len(done['topk'])} finished runs of the "
                  f"pre-registered {len(CONFIRM_SEEDS)} + {len(CONFIRM_SEEDS)}.** The unfinished runs are cut short: "
                  "listed below and left out of the tests.", ""]
    if testable:
        lines += confirm_tests(done)
    lines += ["### Runs", "", "Cut short or not yet finished runs are not in any test." if not complete else "", ""]
    if testable:
        lines += ["| arm | seed | state | HQ % (final) | HQ % (40k–50k mean) | modes % | reverse KL | run folder |",
                  "|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| arm | seed | state | run folder |", "|---|---|---|---|"]
    for arm in ARMS:
        for seed in CONFIRM_SEEDS:
            run = table[(arm, seed)]
            st = state(run, CONFIRM_ITER)
            if not complete and sweep_ended and (run is None or not run.finished):
                st = "cut short: " + st
            folder = f"`{run.path.name}`" if run else "–"
            if testable:
                vals = ["–"] * 4
                if run is not None and run.finished:
                    late = run.mean_at(LATE_STEPS, "hq")
                    vals = [f"{run.final('hq'):.2f}", "–" if late is None else f"{late:.2f}",
                            f"{run.final('modes'):.2f}", f"{run.final('rkl'):.3f}"]
                lines.append(f"| {ARM_NAME[arm]} | {seed} | {st} | " + " | ".join(vals) + f" | {folder} |")
            else:
                lines.append(f"| {ARM_NAME[arm]} | {seed} | {st} | {folder} |")
    lines += other_runs(other)
    return lines


def confirm_tests(done: dict) -> list[str]:
    topk, gan = done["topk"], done["gan"]
    hq = ([r.final("hq") for r in topk], [r.final("hq") for r in gan])
    w = ms.welch(*hq)
    g = ms.hedges_g(*hq)
    lines = ["### Primary endpoint", "",
             "Final HQ % (evaluation at iteration 50,000), top-k minus GAN, two-sided Welch t-test over runs, α = 0.05.", "",
             "| endpoint | GAN mean (n) | top-k mean (n) | difference [95 % Welch CI] | Welch df | p | Hedges' g |",
             "|---|---|---|---|---|---|---|",
             f"| final HQ % | {w.mean_b:.2f} ({w.n_b}) | {w.mean_a:.2f} ({w.n_a}) | {ci(w, 2)} | {w.df:.1f} "
             f"| {ms.fmt_p(w.p)} | {g:+.2f} |", "",
             f"Primary result: top-k's HQ is {'higher' if w.diff > 0 else 'lower'} than the GAN's by "
             f"{abs(w.diff):.2f} points (95 % CI {w.low:+.2f} to {w.high:+.2f}); p = {w.p:.4g}, {'significant' if w.p < 0.05 else 'not significant'} at α = 0.05.", ""]
    missing = [r.path.name for r in topk + gan if r.mean_at(LATE_STEPS, "hq") is None]
    secondary = {
        "HQ % (mean of 40k, 45k, 50k)": [[r.mean_at(LATE_STEPS, "hq") for r in side if r.mean_at(LATE_STEPS, "hq") is not None]
                                         for side in (topk, gan)],
        "modes recovered %": [[r.final("modes") for r in side] for side in (topk, gan)],
        "reverse KL (nats)": [[r.final("rkl") for r in side] for side in (topk, gan)],
    }
    tests = {name: ms.welch(*values) for name, values in secondary.items()}
    adjusted = ms.holm({name: t.p for name, t in tests.items()})
    lines += ["### Secondary endpoints (Holm over the 3)", "",
              "| endpoint | GAN mean (n) | top-k mean (n) | difference [95 % Welch CI] | p | Holm p |",
              "|---|---|---|---|---|---|"]
    for name, t in tests.items():
        digits = 3 if "KL" in name else 2
        lines.append(f"| {name} | {t.mean_b:.{digits}f} ({t.n_b}) | {t.mean_a:.{digits}f} ({t.n_a}) | {ci(t, digits)} "
                     f"| {ms.fmt_p(t.p)} | {ms.fmt_p(adjusted[name])} |")
    if missing:
        lines += ["", "Runs without all three of the 40k/45k/50k evaluations (left out of that endpoint): "
                  + ", ".join(f"`{m}`" for m in missing)]
    return lines + [""]


def other_runs(other) -> list[str]:
    if not other:
        return [""]
    return ["", "Other run folders (not part of the design; not used):", ""] + \
        [f"- `{r.path.name}`: {why}" for r, why in other] + [""]


# ---------------------------------------------------------------------------------------------------------------
# Convergence arm
# ---------------------------------------------------------------------------------------------------------------
def band(runs: list[ms.Run], step: int, key: str):
    values = [r.at(step, key) for r in runs if r.at(step, key) is not None]
    if not values:
        return None
    return float(np.mean(values)), min(values), max(values), len(values)


def fmt_band(b, digits=1) -> str:
    return "–" if b is None else f"{b[0]:.{digits}f} [{b[1]:.{digits}f}, {b[2]:.{digits}f}] ({b[3]})"


def convergence_section(conv_dir: Path, study_dir: Path, png: Path) -> list[str]:
    table, other = cells(ms.read_runs(conv_dir), CONVERGENCE_SEEDS, CONVERGENCE_ITER)
    arm_runs = {arm: [table[(arm, s)] for s in CONVERGENCE_SEEDS if table[(arm, s)] is not None] for arm in ARMS}
    finished = {arm: [r for r in arm_runs[arm] if r.finished] for arm in ARMS}
    lines = ["## Convergence arm: 64 modes, 150,000 iterations, seeds 1–3 (descriptive)", "",
             f"Run folders: `{rel(conv_dir)}`. Finished: GAN {len(finished['gan'])} of 3, top-k "
             f"{len(finished['topk'])} of 3.", "",
             "| arm | seed | state | HQ % at 50k | HQ % at 150k | modes % at 50k | modes % at 150k | run folder |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        for seed in CONVERGENCE_SEEDS:
            run = table[(arm, seed)]
            vals = ["–"] * 4
            if run is not None:
                vals = [f"{v:.2f}" if v is not None else "–"
                        for v in (run.at(50000, "hq"), run.at(CONVERGENCE_ITER, "hq"),
                                  run.at(50000, "modes"), run.at(CONVERGENCE_ITER, "modes"))]
            lines.append(f"| {ARM_NAME[arm]} | {seed} | {state(run, CONVERGENCE_ITER)} | " + " | ".join(vals)
                         + f" | {f'`{run.path.name}`' if run else '–'} |")
    lines += other_runs(other)

    steps = sorted({s for rs in arm_runs.values() for r in rs for s in r.evals if s > 0})
    if not steps:
        png.unlink(missing_ok=True)  # no stale picture beside a report without data
        lines += ["No convergence run has an evaluation yet: no curve, no Δ, no plot.", ""]
    else:
        lines += ["HQ % and modes % per evaluation: mean [min, max] (n runs that have reached the iteration); "
                  "Δ = top-k minus GAN mean HQ, given where both arms have all 3 seeds.", "",
                  "| iteration | GAN HQ % | top-k HQ % | Δ HQ | GAN modes % | top-k modes % |", "|---|---|---|---|---|---|"]
        for s in steps:
            bg, bt = band(arm_runs["gan"], s, "hq"), band(arm_runs["topk"], s, "hq")
            full = bg is not None and bt is not None and bg[3] == 3 and bt[3] == 3
            lines.append(f"| {s:,} | {fmt_band(bg)} | {fmt_band(bt)} | {f'{bt[0] - bg[0]:+.1f}' if full else '–'} "
                         f"| {fmt_band(band(arm_runs['gan'], s, 'modes'))} | {fmt_band(band(arm_runs['topk'], s, 'modes'))} |")
        lines.append("")
        plot(arm_runs, png)
        lines += [f"![HQ % and modes % against iteration, mean and min–max band per arm]({png.name})", ""]

    lines += ["### Verdict (pre-registered rule)", "",
              "Δ(t) = top-k minus GAN mean HQ % at iteration t over seeds 1–3. The gap holds when Δ(150k) ≥ Δ(50k)/2, "
              "shrinks when 0 < Δ(150k) < Δ(50k)/2, closes when Δ(150k) ≤ 0, grows when Δ(150k) > Δ(50k) "
              "(a gap that grows also meets 'holds': grows is tested first).", ""]
    all_done = all(len(finished[a]) == 3 for a in ARMS)
    d50 = delta(arm_runs, 50000)
    if d50 is not None:
        lines.append(f"Δ(50k) = {d50:+.2f} points.")
    if all_done and d50 is not None and delta(arm_runs, CONVERGENCE_ITER) is not None:
        d150 = delta(arm_runs, CONVERGENCE_ITER)
        lines += [f"Δ(150k) = {d150:+.2f} points.", "",
                  f"**Verdict: the gap {ms.convergence_verdict(d50, d150)}.**" if ms.convergence_verdict(d50, d150) != "undefined"
                  else "**Verdict: undefined (Δ(50k) ≤ 0; the rule is stated for a positive gap at 50k).**"]
    else:
        lines.append("Verdict: not yet (it needs all 6 runs finished at 150,000 iterations).")
    lines += [""] + check_section(table, study_dir)
    return lines


def delta(arm_runs: dict, step: int) -> float | None:
    bg, bt = band(arm_runs["gan"], step, "hq"), band(arm_runs["topk"], step, "hq")
    if bg is None or bt is None or bg[3] != 3 or bt[3] != 3:
        return None
    return bt[0] - bg[0]


def check_section(table: dict, study_dir: Path) -> list[str]:
    """Does each 150k run repeat the committed 50k run of its arm and seed at the evaluations 5k-50k?"""
    study = ms.read_runs(study_dir)
    steps = list(range(5000, 50001, 5000))
    lines = [f"### Check: the 150k runs against the committed 50k runs (`{rel(study_dir)}`)", "",
             "Evaluations at 5k, 10k, ..., 50k (HQ, modes, reverse KL); equal means every value equal to 1e-9.", "",
             "| arm | seed | committed run | evaluations compared | max abs difference (HQ points / modes points / reverse KL) | result |",
             "|---|---|---|---|---|---|"]
    for (arm, seed), run in table.items():
        ref = ms.pick(study, MODES, arm, seed, CONFIRM_ITER)
        if ref is None or not ref.finished:
            lines.append(f"| {ARM_NAME[arm]} | {seed} | none finished | – | – | no committed run |")
            continue
        common = [s for s in steps if run is not None and s in run.evals and s in ref.evals]
        if not common:
            lines.append(f"| {ARM_NAME[arm]} | {seed} | `{ref.path.name}` | 0 of {len(steps)} | – | not yet |")
            continue
        diff = {k: max(abs(run.evals[s][k] - ref.evals[s][k]) for s in common) for k in ("hq", "modes", "rkl")}
        same = all(v <= 1e-9 for v in diff.values())
        first = next((s for s in common if any(abs(run.evals[s][k] - ref.evals[s][k]) > 1e-9 for k in diff)), None)
        result = "equal" if same else f"differs from iteration {first:,}"
        lines.append(f"| {ARM_NAME[arm]} | {seed} | `{ref.path.name}` | {len(common)} of {len(steps)} "
                     f"| {diff['hq']:.2g} / {diff['modes']:.2g} / {diff['rkl']:.2g} | {result} |")
    return lines + [""]


def plot(arm_runs: dict, path: Path, size=(900, 700)) -> None:
    """Two panels (HQ %, modes %) against iteration: per arm the min-max band, the mean and each run (thin)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    W, H = size
    left, right, top, gap, bottom = 70, 20, 40, 60, 45
    ph = (H - top - gap - bottom) // 2
    x_max = CONVERGENCE_ITER
    draw.text((left, 12), "64 modes, setup all: mean and min-max band over seeds 1-3 (thin: single runs)", fill="black",
              font=font)
    for panel, (key, label) in enumerate((("hq", "HQ %"), ("modes", "modes %"))):
        y0 = top + panel * (ph + gap)
        values = [v[key] for rs in arm_runs.values() for r in rs for s, v in r.evals.items() if s > 0]
        lo = 0.0 if key == "hq" else max(0.0, 10 * np.floor(min(values, default=0) / 10) - 10)
        hi = 100.0

        def px(step, v):
            return left + (W - left - right) * step / x_max, y0 + ph - ph * (v - lo) / (hi - lo)

        draw.rectangle([left, y0, W - right, y0 + ph], outline="black")
        for tick in range(0, x_max + 1, 25000):
            x, _ = px(tick, lo)
            draw.line([x, y0 + ph, x, y0 + ph + 4], fill="black")
            draw.text((x - 12, y0 + ph + 6), f"{tick // 1000}k", fill="black", font=font)
        for i in range(6):
            v = lo + (hi - lo) * i / 5
            _, y = px(0, v)
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((left - 34, y - 5), f"{v:.0f}", fill="black", font=font)
        x50, _ = px(50000, lo)
        for y in range(y0, y0 + ph, 8):
            draw.line([x50, y, x50, y + 4], fill=(150, 150, 150))
        draw.text((8, y0 + ph // 2), label, fill="black", font=font)
        for arm, runs in arm_runs.items():
            colour = COLOURS[arm]
            light = tuple(int(c + (255 - c) * 0.75) for c in colour)
            steps = sorted({s for r in runs for s in r.evals if s > 0})
            stats_ = [(s, band(runs, s, key)) for s in steps]
            if len(stats_) >= 2:
                poly = [px(s, b[2]) for s, b in stats_] + [px(s, b[1]) for s, b in reversed(stats_)]
                draw.polygon(poly, fill=light)
        for arm, runs in arm_runs.items():
            colour = COLOURS[arm]
            for r in runs:
                pts = [px(s, r.evals[s][key]) for s in sorted(r.evals) if s > 0]
                if len(pts) >= 2:
                    draw.line(pts, fill=tuple(int(c + (255 - c) * 0.45) for c in colour), width=1)
            steps = sorted({s for r in runs for s in r.evals if s > 0})
            pts = [px(s, band(runs, s, key)[0]) for s in steps]
            if len(pts) >= 2:
                draw.line(pts, fill=colour, width=3)
    for i, arm in enumerate(ARMS):
        x = left + 10 + 110 * i
        draw.line([x, H - 18, x + 25, H - 18], fill=COLOURS[arm], width=3)
        draw.text((x + 30, H - 24), ARM_NAME[arm], fill="black", font=font)
    draw.text((left + 240, H - 24), "iteration (dashed: 50k, the paper's length)", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ---------------------------------------------------------------------------------------------------------------
# 100 modes: lock-in
# ---------------------------------------------------------------------------------------------------------------
def lockin_section(study_dir: Path) -> list[str]:
    runs = ms.read_runs(study_dir)
    lines = [f"## 100 modes: lock-in rate (committed runs, `{rel(study_dir)}`, seeds 1–3, 50,000 iterations)", "",
             f"A run locks in when it recovers ≥ {LOCK_IN:.0f} % of the modes.", "",
             "| arm | seed | modes % | HQ % | locked in | run folder |", "|---|---|---|---|---|---|"]
    counts = {}
    for arm in ARMS:
        done = [r for r in (ms.pick(runs, 100, arm, s, CONFIRM_ITER) for s in CONVERGENCE_SEEDS) if r and r.finished]
        counts[arm] = (sum(r.final("modes") >= LOCK_IN for r in done), len(done))
        for r in done:
            lines.append(f"| {ARM_NAME[arm]} | {r.seed} | {r.final('modes'):.1f} | {r.final('hq'):.1f} "
                         f"| {'yes' if r.final('modes') >= LOCK_IN else 'no'} | `{r.path.name}` |")
    (kt, nt), (kg, ng) = counts["topk"], counts["gan"]
    lines.append("")
    if nt == 0 or ng == 0:
        return lines[:4] + ["No finished 100-mode runs in one arm: no test.", ""]
    p = ms.fisher_p(kt, nt, kg, ng)
    n = ms.n_two_proportions(kt / nt, kg / ng)
    ncc = ms.n_two_proportions(kt / nt, kg / ng, continuity=True)
    nf = ms.n_fisher(kt / nt, kg / ng)
    lines += [f"Lock-in rate: top-k {kt} of {nt}, GAN {kg} of {ng}; two-sided Fisher exact p = {p:.3f}.", ""]
    if n is None:
        lines.append("The observed rates are equal: no sample size detects a difference of zero.")
    elif nf is None:
        lines.append(f"For the observed rates ({kt / nt:.2f} against {kg / ng:.2f}), a two-sided two-proportion z-test "
                     f"at α = 0.05 with power 0.8 needs {n} runs per arm (normal approximation; {ncc} with the Fleiss "
                     "continuity correction; the Fisher exact test does not reach power 0.8 within 400 runs per arm).")
    else:
        lines.append(f"For the observed rates ({kt / nt:.2f} against {kg / ng:.2f}), a two-sided two-proportion z-test "
                     f"at α = 0.05 with power 0.8 needs {n} runs per arm (normal approximation; {ncc} with the Fleiss "
                     f"continuity correction; the two-sided Fisher exact test first reaches power 0.8 at {nf} runs per arm, by "
                     "exact enumeration).")
    return lines + [""]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = resolve(args.out)
    png = out / "convergence.png"
    command = "python analysis/mog_confirm.py" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    lines = ["# MoG 64-mode confirmatory study (pre-registered in docs/mog_study.md)", "",
             f"Made by `{command}` from the run folders alone; every number below comes from that command.", ""]
    lines += confirm_section(resolve(args.confirm_dir), args.sweep_ended)
    lines += convergence_section(resolve(args.convergence_dir), resolve(args.study_dir), png)
    lines += lockin_section(resolve(args.study_dir))
    ms.write_report(lines, out / "confirm.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
