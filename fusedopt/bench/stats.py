"""Statistics of the timed repetitions: quantiles, the per-contender summary, paired (per-round) ratios."""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> Dict[str, float]:
    s = sorted(times)
    return dict(median_s=quantile(s, 0.5), q1_s=quantile(s, 0.25), q3_s=quantile(s, 0.75), min_s=s[0], max_s=s[-1])


def paired_ratio(a: dict, b: dict) -> Optional[Dict[str, float]]:
    """How many times faster `a` is than `b`: median-based, and the spread of the per-round (paired) ratios."""
    if a.get("status") != "ok" or b.get("status") != "ok":
        return None
    n = min(len(a["times_s"]), len(b["times_s"]))
    per_round = sorted(b["times_s"][i] / a["times_s"][i] for i in range(n))
    return dict(ratio=b["median_s"] / a["median_s"], round_median=quantile(per_round, 0.5),
                round_q1=quantile(per_round, 0.25), round_q3=quantile(per_round, 0.75), rounds=n)
