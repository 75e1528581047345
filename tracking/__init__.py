"""Experiment tracking and lineage: MLflow or TensorBoard for every run, sweep and export, and the id
chain from a package back to its run, config and data.

    records.py      `Lineage`, `TrackingRef`, `DataFingerprint`: the typed records runs and packages carry
    fingerprint.py  a content fingerprint of each data source, cached by size and modification time
    tracker.py      `Tracker`: one run in MLflow (or TensorBoard), failure-safe; `config_hash`, `flatten`
    callbacks.py    the Ray Train callback (per-epoch metrics, rank 0 only) and the Tune callback (nested trials)
    store.py        reading runs back for `python -m ray_apps runs`: from MLflow, or from run directories

Nothing here imports Ray at import time.
"""
