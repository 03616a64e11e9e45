"""Serve: the daemon. Its lifecycle (server), HTTP handlers (http), the inference worker
(inference), the score sink that turns scores into gauges and alert transitions (sink) and its
own metrics (metrics). Never imports `detectord.offline`."""
