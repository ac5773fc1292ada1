"""How often DeLong's 95% CI of an AUC excludes 0.5 when the score knows nothing (issue 18's null control).

    python bench/delong_null.py [--n 45] [--prevalence 0.269 0.378] [--draws 20000] [--seed 18]

A fixed continuous score for n patients; the outcomes drawn independently of it, each patient an event with the
given probability, `--draws` times (draws with fewer than 2 events or non-events are skipped). For each draw, the
AUC's DeLong CI as the evaluate stage reports it (`radstudy.evaluate.metrics.auc_delong`, normal CI as pROC's
ci.auc). The share of draws whose CI excludes 0.5 is the test's real type I error at that size: the rate the validity
study's null control should be compared with, rather than the nominal 5%. The demo's external center has 45 patients;
under the null control (latent risk 0) P(event) is logistic(-1.0) = 0.269.
"""

from __future__ import annotations

import argparse

import numpy as np
from radstudy.evaluate.metrics import auc_delong


def exclusion_rate(n: int, prevalence: float, draws: int, rng: np.random.Generator) -> tuple[float, int]:
    """(share of null draws whose DeLong 95% CI excludes 0.5, draws used)."""
    score = rng.normal(size=n)
    excluded = used = 0
    for _ in range(draws):
        y = (rng.random(n) < prevalence).astype(int)
        if min(y.sum(), n - y.sum()) < 2:
            continue
        ci = auc_delong(y, score)
        used += 1
        excluded += ci["ci_low"] > 0.5 or ci["ci_high"] < 0.5
    return excluded / used, used


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[45, 100])
    parser.add_argument("--prevalence", type=float, nargs="+", default=[0.269, 0.378])
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for n in args.n:
        for p in args.prevalence:
            rate, used = exclusion_rate(n, p, args.draws, rng)
            print(f"n {n}, P(event) {p}: DeLong 95% CI excludes 0.5 in {rate:.4f} of {used} null draws "
                  f"(binomial SE {np.sqrt(rate * (1 - rate) / used):.4f})", flush=True)


if __name__ == "__main__":
    main()
