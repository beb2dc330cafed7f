"""Intervals over runs and items: how sure a retention difference measured on a sample of evaluation items is.

fresh_items.py (the default against each baseline over instances, calibration seeds and items) and headroom.py
(a searched keep map against the best baseline, items only) draw from the same crossed bootstrap.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import t as student_t


def crossed_bootstrap(differences: np.ndarray, base: np.ndarray, domain_of_item: np.ndarray, *, draws: int,
                      seed: int = 0, resample_runs: bool = True) -> np.ndarray:
    """Bootstrap distribution of the mean retention difference over runs and items.

    ``differences``: [runs, items] outcome differences (default minus baseline, -1/0/1); ``base``: [runs, items]
    the unpruned instance's outcomes of each run. Each draw takes runs with replacement and, independently, items
    with replacement within each domain (the macro accuracy weighs domains equally), and averages over the drawn
    runs the drawn items' difference divided by the drawn items' unpruned accuracy. ``resample_runs=False`` keeps
    every run in every draw: the question is then about these runs (these instances), and only items vary.
    """
    rng = np.random.default_rng(seed)
    runs, num_items = differences.shape
    item_weights = np.zeros((draws, num_items))
    for domain in np.unique(domain_of_item):
        members = np.flatnonzero(domain_of_item == domain)
        picks = rng.integers(0, len(members), size=(draws, len(members)))
        np.add.at(item_weights, (np.arange(draws)[:, None], members[picks]), 1.0)
    per_run = (item_weights @ differences.T) / (item_weights @ base.T)  # [draws, runs]
    if not resample_runs:
        return per_run.mean(axis=1)
    run_weights = np.stack([np.bincount(rng.integers(0, runs, size=runs), minlength=runs) for _ in range(draws)])
    return (per_run * run_weights).sum(axis=1) / runs


def interval(mean: float, boot: np.ndarray, runs: int, level: float) -> tuple[float, float]:
    """Two-sided ``1 - level`` interval of the mean difference from its bootstrap draws.

    A percentile interval is too narrow with few runs: resampling n runs shrinks their variance by (n - 1) / n,
    and the normal quantile ignores that the variance itself is estimated from n runs. So the interval is
    mean +- t(n - 1) * sd(draws) * sqrt(n / (n - 1)): Student's quantile on the corrected bootstrap error.
    """
    if runs < 2:
        return -math.inf, math.inf
    error = float(np.std(boot, ddof=1)) * math.sqrt(runs / (runs - 1))
    quantile = float(student_t.ppf(1 - level / 2, runs - 1))
    return mean - quantile * error, mean + quantile * error
