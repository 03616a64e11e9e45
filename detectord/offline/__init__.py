"""Offline: everything that needs the `train` extra and never runs in the daemon. Data sets
(dataset), training (training), hyperparameter search (tuning), evaluation (evaluation), reports
and model cards (report) and the detectors we compare against (comparisons)."""
