"""Experiment tracking and lineage: MLflow or TensorBoard for every run, sweep and export, and the id
chain from a package back to its run, config and data.

    records.py      `Lineage`, `TrackingRef`, `DataFingerprint`: the typed records runs and packages carry
    fingerprint.py  a content fingerprint of each data source, cached by size and modification time
    tracker.py      `Tracker`: one run in MLflow (or TensorBoard), failure-safe; `config_hash`, `flatten`
    train_callback.py  the Ray Train callback: per-epoch metrics from the Train controller, rank 0 only
    callbacks.py    the Tune callback: one nested run per trial, with its end reason and PBT clones
    store.py        reading runs back for `python -m ray_apps runs`: from MLflow, or from run directories

Only the two callback modules import Ray at import time; only `callbacks.py` imports MLflow.
"""
