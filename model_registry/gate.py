"""The promotion gate: is a candidate package at least as good as the champion, on the same rows?

The metric and its direction come from the model's `GatePolicy` in the registry, never from the
candidate's metadata. Both packages record every validation metric, measured by ONNX Runtime at
export. When both were measured on the same rows (same fingerprint: labels and raw inputs), those
numbers are compared. Otherwise both packages are scored again, each with its own ONNX model and
tokenizer, on the candidate's validation rows, so the comparison never mixes data sets.
"""

from __future__ import annotations

from model_registry.package import ModelPackage
from model_registry.predictor import Predictor, score
from model_registry.registry import GatePolicy, GateResult


def _rescore(candidate: ModelPackage, champion: ModelPackage, metric: str) -> tuple[float, float, str]:
    from model_registry.validation import load_validation
    from trainers.config import parse_job

    job = parse_job(candidate.metadata.training.config, f"{candidate.path}/metadata.json")
    values = []
    for pkg in (candidate, champion):
        predictor = Predictor(pkg, "onnx", "auto")
        values.append(score(predictor, load_validation(job, pkg.labels, predictor.tokenizer))[metric])
    return values[0], values[1], f"re-measured on {candidate.metadata.validation.source}"


def compare(candidate: ModelPackage, champion: ModelPackage, tolerance: float, policy: GatePolicy) -> GateResult:
    cv, pv = candidate.metadata.validation, champion.metadata.validation
    metric, mode = policy.metric, policy.mode
    if candidate.labels != champion.labels:
        return GateResult(passed=False, metric=metric, mode=mode, champion_version=champion.metadata.version,
                          summary=f"labels differ ({candidate.labels[:5]} vs {champion.labels[:5]}); not the same task")
    recorded = metric in cv.metrics.get("onnx", {}) and metric in pv.metrics.get("onnx", {})
    if cv.fingerprint == pv.fingerprint and recorded:
        new, old, how = cv.metrics["onnx"][metric], pv.metrics["onnx"][metric], f"recorded on the same {cv.rows} rows"
    else:
        new, old, how = _rescore(candidate, champion, metric)
    passed = new >= old - tolerance if mode == "max" else new <= old + tolerance
    bound = f">= {old - tolerance:.4f}" if mode == "max" else f"<= {old + tolerance:.4f}"
    summary = (f"{metric} {new:.4f} vs champion {champion.ref} {old:.4f} ({how}); needs {bound} "
               f"(tolerance {tolerance:g}): {'passed' if passed else 'refused'}")
    return GateResult(passed=passed, metric=metric, mode=mode, candidate=new, champion=old,
                      champion_version=champion.metadata.version, tolerance=tolerance, measured=how, summary=summary)
