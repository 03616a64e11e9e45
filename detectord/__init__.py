"""detectord: anomaly detection for CoreDNS fleets from Prometheus remote-write."""

__version__ = "0.1.0"
