"""The drift and accuracy tests of one window against the reference profile (scipy.stats).

Each signal has a score (the size of the shift), a p-value (how surprising it is under no shift) and
an alarm. Output signals follow black-box shift detection (Rabanser et al., 2019): the softmax
outputs' per-class Kolmogorov-Smirnov tests, Bonferroni-corrected over the classes, and the
chi-squared test of the predicted-class counts. For text, the model's pooled embedding is tested the
same way in its first principal components. Input signals compare token lengths, unknown tokens or
each numeric feature with the reference. A signal alarms when its p-value is below alpha divided by
the number of signals tested (Bonferroni again, so a window of a healthy model alarms with
probability at most alpha) and its score reaches the policy's minimum effect.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from monitoring.config import Thresholds
from monitoring.profile import ReferenceProfile
from monitoring.window import WindowCounts

EPS = 1e-4  # floor of a bin's share in PSI and of expected counts in chi-squared (an empty reference bin)


class SignalResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    signal: str
    score: float = Field(description="PSI, KS distance, rise of the unknown-token share, or accuracy drop.")
    min_score: float = Field(description="The smallest score that alarms.")
    p_value: float
    alpha: float = Field(description="The p-value below which it alarms (Bonferroni-corrected).")
    alarm: bool
    detail: str = ""


def psi(reference: list[float] | np.ndarray, counts: list[int] | np.ndarray) -> float:
    """Population stability index: sum (q - p) ln(q / p) over bins, shares floored at EPS."""
    p = np.maximum(np.asarray(reference, dtype=np.float64), EPS)
    q = np.asarray(counts, dtype=np.float64)
    q = np.maximum(q / max(1.0, q.sum()), EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def chi2_p(reference: list[float] | np.ndarray, counts: list[int] | np.ndarray) -> float:
    """Chi-squared goodness of fit of the counts to the reference shares (bins the reference never saw
    get a floor, so any count there is very surprising, as it should be)."""
    f_obs = np.asarray(counts, dtype=np.float64)
    n = f_obs.sum()
    if n == 0 or len(f_obs) < 2:
        return 1.0
    p = np.maximum(np.asarray(reference, dtype=np.float64), EPS)
    f_exp = n * p / p.sum()
    return float(stats.chisquare(f_obs, f_exp).pvalue)


def chi2_ps(references: list[list[float]], counts: list[list[int]]) -> np.ndarray:
    """chi2_p for many distributions at once (one scipy call for every p-value: the features of a window)."""
    stat, dof = np.zeros(len(counts)), np.zeros(len(counts))
    for j, (reference, c) in enumerate(zip(references, counts)):
        f_obs = np.asarray(c, dtype=np.float64)
        p = np.maximum(np.asarray(reference, dtype=np.float64), EPS)
        f_exp = f_obs.sum() * p / p.sum()
        if f_obs.sum() > 0 and len(f_obs) >= 2:
            stat[j], dof[j] = np.sum((f_obs - f_exp) ** 2 / f_exp), len(f_obs) - 1
    return np.where(dof > 0, stats.chi2.sf(stat, np.maximum(dof, 1)), 1.0)


def drift_signals(profile: ReferenceProfile, window: WindowCounts, t: Thresholds) -> list[SignalResult]:
    """Every drift signal the profile supports, scored on one (merged) window."""
    raw: list[tuple[str, float, float, float, str]] = []  # signal, score, min_score, p, detail
    raw.append(("class_shares", psi(profile.class_shares, window.classes), t.min_psi,
                chi2_p(profile.class_shares, window.classes), "PSI of predicted-class shares; chi-squared"))
    k = len(profile.class_shares)
    ref = np.asarray(profile.softmax_sample, dtype=np.float64)
    rows = np.asarray(window.sample, dtype=np.float64).reshape(len(window.sample), -1)
    cur = rows[:, :k]
    if len(ref) and len(cur) >= 2:
        conf = stats.ks_2samp(ref.max(axis=1), cur.max(axis=1), method="asymp")
        raw.append(("confidence", float(conf.statistic), t.min_ks, float(conf.pvalue),
                    f"KS of top-class confidence on {len(cur)} sampled rows"))
        dims = ref.shape[1] if ref.shape[1] > 2 else 1  # two classes: p1 = 1 - p0, one test says it all
        tests = [stats.ks_2samp(ref[:, j], cur[:, j], method="asymp") for j in range(dims)]
        worst = max(tests, key=lambda r: r.statistic)
        raw.append(("softmax", float(worst.statistic), t.min_ks,
                    min(1.0, dims * min(float(r.pvalue) for r in tests)),
                    f"largest per-class KS over {dims} class(es), Bonferroni-corrected"))
    if profile.embedding is not None and window.embedding_dims:
        emb_ref = np.asarray(profile.embedding.sample, dtype=np.float64)
        emb = rows[:, k:k + window.embedding_dims]
        emb = emb[np.isfinite(emb).all(axis=1)]
        if len(emb) >= 2 and emb.shape[1] == emb_ref.shape[1]:
            tests = [stats.ks_2samp(emb_ref[:, j], emb[:, j], method="asymp") for j in range(emb.shape[1])]
            worst = max(tests, key=lambda r: r.statistic)
            raw.append(("embedding", float(worst.statistic), t.min_ks,
                        min(1.0, len(tests) * min(float(r.pvalue) for r in tests)),
                        f"largest KS over the pooled embedding's {len(tests)} principal components, "
                        "Bonferroni-corrected"))
    if profile.text_length is not None and window.lengths is not None:
        raw.append(("text_length", psi(profile.text_length.shares, window.lengths), t.min_psi,
                    chi2_p(profile.text_length.shares, window.lengths), "PSI of token length; chi-squared"))
    if profile.unknown_share is not None and window.unknown_rows is not None:
        base = max(profile.unknown_share, 1e-3)
        share = window.unknown_rows / max(1, window.instances)
        p = stats.binomtest(window.unknown_rows, window.instances, base, alternative="greater").pvalue
        raw.append(("unknown_tokens", share - profile.unknown_share, t.min_unknown_increase, float(p),
                    f"share of texts with an unknown token: {share:.3f} against {profile.unknown_share:.3f}"))
    if profile.features is not None and window.features is not None:
        scores = [psi(b.shares, c) for b, c in zip(profile.features, window.features)]
        ps = chi2_ps([b.shares for b in profile.features], window.features).tolist()
        j = int(np.argmax(scores))
        raw.append(("features", scores[j], t.min_psi, min(1.0, len(ps) * min(ps)),
                    f"largest per-feature PSI (feature {j}) over {len(ps)} features, Bonferroni-corrected"))
    return _decide(raw, t.alpha)


def accuracy_signal(profile: ReferenceProfile, correct: int, total: int, t: Thresholds) -> SignalResult:
    """Live accuracy on a window of feedback labels against the package's validation accuracy: a one-sided
    binomial test that it fell."""
    accuracy = correct / total
    p = stats.binomtest(correct, total, min(profile.accuracy, 1 - 1e-9), alternative="less").pvalue
    return _decide([("live_accuracy", profile.accuracy - accuracy, t.min_accuracy_drop, float(p),
                     f"live accuracy {accuracy:.4f} on {total} labels against {profile.accuracy:.4f} at validation")],
                   t.alpha)[0]


def _decide(raw: list[tuple[str, float, float, float, str]], alpha: float) -> list[SignalResult]:
    level = alpha / max(1, len(raw))
    return [SignalResult(signal=s, score=round(score, 6), min_score=m, p_value=p, alpha=level,
                         alarm=bool(p < level and score >= m), detail=d) for s, score, m, p, d in raw]
