"""Alerting: when an alert fires and resolves (timing, one definition shared by serving and every
evaluation), per-instance alert states (states) and their delivery to Alertmanager (notifier)."""
