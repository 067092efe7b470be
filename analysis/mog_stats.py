"""Run-folder reading and the statistics of the MoG reports (analysis/mog_confirm.py, analysis/mog_exploratory_stats.py).

Run folders are mog_topk.py's: `<exp>__<seed>__<unix time>/` with args.json (every argument), metrics.jsonl (one
record per line; evaluation records carry `eval/high_quality`, `eval/modes_recovered`, `eval/reverse_kl`) and, once
the run has ended, summary.json. A run is identified by its args.json (seed, --topk, --bottomk, --n-modes, ...), never
by its folder name, and it is finished when summary.json exists with step == the run's --iterations.

Values are in the reports' units: HQ and modes in percent (100 x the stored fraction), reverse KL in nats.

Statistics (numpy/scipy only):
  * welch: two-sided Welch t-test of mean(a) - mean(b), with the Welch-Satterthwaite df and the 95 % confidence
    interval of the difference. When both sides have zero spread the t statistic does not exist; as in
    sweeps/mog_table1.py, p is then 1 for equal means and 0 otherwise, and the interval is the difference itself.
  * hedges_g: (mean(a) - mean(b)) / pooled sample std, times J = 1 - 3 / (4 (n_a + n_b) - 9).
  * holm: Holm-Bonferroni adjusted p-values of a family.
  * fisher_p: two-sided Fisher exact test of a 2 x 2 table of successes / failures (scipy.stats.fisher_exact).
  * n_two_proportions: runs per arm a two-sided two-proportion z-test needs to detect p1 vs p2 at alpha with the
    given power (normal approximation with the pooled variance under H0; optionally the Fleiss continuity
    correction).
  * fisher_power / n_fisher: the exact power of that Fisher test with n runs per arm, and the smallest n that
    reaches the given power (enumerating every outcome).
  * sign_test: two-sided binomial test of the number of positive differences (zeros dropped).
  * convergence_verdict: the pre-registered rule of docs/mog_study.md for the gap at 50k and 150k iterations.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

KEYS = {"hq": ("high_quality", 100.0), "modes": ("modes_recovered", 100.0), "rkl": ("reverse_kl", 1.0)}


# ---------------------------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    args: dict
    summary: dict | None
    evals: dict = field(default_factory=dict)  # step -> {"hq", "modes", "rkl"} (the last record of a step)
    last_step: int | None = None               # the last step any metrics.jsonl record names

    @property
    def seed(self) -> int:
        return int(self.args["seed"])

    @property
    def variant(self) -> str:
        return variant_of(self.args)

    @property
    def n_modes(self) -> int:
        return int(self.args["n_modes"])

    @property
    def iterations(self) -> int:
        return int(self.args["iterations"])

    @property
    def finished(self) -> bool:
        return self.summary is not None and self.summary.get("step") == self.iterations

    @property
    def started(self) -> int | None:
        """Unix time in the folder name (make_run_dir stamps it when the folder is created), or None."""
        m = re.search(r"__(\d+)(?:_\d+)?$", self.path.name)
        return int(m.group(1)) if m else None

    def final(self, key: str) -> float:
        """A finished run's final value of `key` (hq / modes / rkl) from summary.json."""
        name, scale = KEYS[key]
        return scale * float(self.summary[name])

    def at(self, step: int, key: str) -> float | None:
        record = self.evals.get(step)
        return None if record is None else record[key]

    def mean_at(self, steps, key: str) -> float | None:
        """Mean of `key` over the evaluations at `steps`; None when one of them is missing."""
        values = [self.at(s, key) for s in steps]
        return None if any(v is None for v in values) else float(np.mean(values))


def variant_of(args: dict) -> str:
    if args.get("bottomk"):
        return "bottomk"
    return "topk" if args.get("topk") else "gan"


def read_run(path: Path) -> Run | None:
    """The run in folder `path`, or None when it has no readable args.json. A metrics.jsonl line that does not parse
    (a record being written) is skipped."""
    path = Path(path)
    try:
        args = json.loads((path / "args.json").read_text())
    except (OSError, ValueError):
        return None
    summary = None
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    run = Run(path=path, args=args, summary=summary)
    try:
        lines = (path / "metrics.jsonl").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        step = int(record["step"])
        run.last_step = step if run.last_step is None else max(run.last_step, step)
        if "eval/high_quality" in record:
            run.evals[step] = {key: scale * float(record[f"eval/{name}"]) for key, (name, scale) in KEYS.items()}
    return run


def read_runs(root: Path) -> list[Run]:
    """Every run folder directly under `root` (folders without args.json are not runs), in name order."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = (read_run(p) for p in sorted(root.iterdir()) if p.is_dir())
    return [r for r in runs if r is not None]


def pick(runs: list[Run], n_modes: int, variant: str, seed: int, iterations: int | None = None) -> Run | None:
    """The run of one cell: the newest finished one, else the newest unfinished one, else None."""
    cell = [r for r in runs if r.n_modes == n_modes and r.variant == variant and r.seed == seed
            and (iterations is None or r.iterations == iterations)]
    done = [r for r in cell if r.finished]
    return (done or cell or [None])[-1]


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Welch:
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    t: float
    df: float
    p: float
    n_a: int
    n_b: int


def welch(a, b, confidence: float = 0.95) -> Welch:
    """Two-sided Welch t-test of mean(a) - mean(b) with its confidence interval (see the module docstring)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Welch test needs at least 2 values a side")
    ma, mb = float(a.mean()), float(b.mean())
    diff = ma - mb
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Welch(ma, mb, diff, diff, diff, math.nan, math.nan, 1.0 if diff == 0 else 0.0, len(a), len(b))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = diff / se
    p = float(2 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Welch(ma, mb, diff, diff - half, diff + half, t, df, p, len(a), len(b))


def hedges_g(a, b) -> float:
    """Hedges' g of a minus b (nan when the pooled std is 0)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = len(a), len(b)
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    if pooled == 0:
        return math.nan
    return (1 - 3 / (4 * (na + nb) - 9)) * (a.mean() - b.mean()) / pooled


def holm(pvalues: dict) -> dict:
    """Holm-Bonferroni adjusted p-values {label: p}: the j-th smallest of m (j from 0) becomes
    max over i <= j of min(1, (m - i) p_(i))."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    adjusted, running = {}, 0.0
    for i, label in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[label]))
        adjusted[label] = running
    return adjusted


def fisher_p(k_a: int, n_a: int, k_b: int, n_b: int) -> float:
    """Two-sided Fisher exact p of k_a / n_a against k_b / n_b successes."""
    return float(stats.fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]], alternative="two-sided").pvalue)


def n_two_proportions(p1: float, p2: float, alpha: float = 0.05, power: float = 0.8,
                      continuity: bool = False) -> int | None:
    """Runs per arm for a two-sided two-proportion z-test to detect p1 vs p2 (None when p1 == p2)."""
    if p1 == p2:
        return None
    za, zb = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    pbar = (p1 + p2) / 2
    delta = abs(p1 - p2)
    n = (za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / delta ** 2
    if continuity:
        n = n / 4 * (1 + math.sqrt(1 + 4 / (n * delta))) ** 2
    return math.ceil(n - 1e-9)


def fisher_power(n: int, p1: float, p2: float, alpha: float = 0.05) -> float:
    """Exact power of the two-sided Fisher exact test with n runs per arm when the true rates are p1 and p2: the
    probability of the outcomes (x1, x2) whose Fisher p (scipy's two-sided rule: the tables no more likely than the
    observed one, to a relative 1e-7) is <= alpha."""
    x = np.arange(n + 1)
    b1, b2 = stats.binom.pmf(x, n, p1), stats.binom.pmf(x, n, p2)
    power = 0.0
    for s in range(2 * n + 1):  # condition on the total number of successes
        lo, hi = max(0, s - n), min(n, s)
        k = np.arange(lo, hi + 1)
        pmf = stats.hypergeom.pmf(k, 2 * n, s, n)
        pvals = np.array([pmf[pmf <= q * (1 + 1e-7)].sum() for q in pmf])
        power += float(np.sum((b1[k] * b2[s - k])[pvals <= alpha]))
    return power


def n_fisher(p1: float, p2: float, alpha: float = 0.05, power: float = 0.8, n_max: int = 400) -> int | None:
    """Smallest n per arm at which the two-sided Fisher exact test reaches `power` (None when p1 == p2 or not by
    n_max). Fisher's power is not monotone in n, so a few n above it can fall just below `power` again."""
    if p1 == p2:
        return None
    for n in range(2, n_max + 1):
        if fisher_power(n, p1, p2, alpha) >= power:
            return n
    return None


def sign_test(diffs) -> tuple[int, int, float]:
    """(positive, negative, two-sided binomial p) over the nonzero differences."""
    diffs = np.asarray(diffs, float)
    pos, neg = int((diffs > 0).sum()), int((diffs < 0).sum())
    p = float(stats.binomtest(pos, pos + neg, 0.5).pvalue) if pos + neg else 1.0
    return pos, neg, p


def convergence_verdict(d50: float, d150: float) -> str:
    """The pre-registered rule (docs/mog_study.md) for the top-k minus GAN gap in mean HQ at 50k and 150k:
    closes when d150 <= 0, grows when d150 > d50, holds when d150 >= d50 / 2, shrinks when 0 < d150 < d50 / 2.
    The rule is stated for a positive gap at 50k; with d50 <= 0 it gives 'undefined'."""
    if d50 <= 0:
        return "undefined"
    if d150 <= 0:
        return "closes"
    if d150 > d50:
        return "grows"
    if d150 >= d50 / 2:
        return "holds"
    return "shrinks"


def fmt_p(p: float | None) -> str:
    """3 decimals, or 2 significant digits below 0.001; '–' for None."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.1e}"


def write_report(lines: list[str], path: Path) -> None:
    """Markdown lines as `path` (at most one blank line in a row; its folder is made) and on stdout."""
    text = "\n".join(lines).rstrip() + "\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
