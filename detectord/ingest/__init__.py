"""Ingest: remote-write bytes to model inputs. Decoding (remote_write, the C fast path), the
CoreDNS feature table and extractor (features), per-instance baselines (normalise), ring buffers
(windows), the ingest thread that runs them (pipeline) and the HTTP intake (intake).

Imports neither Keras nor anything of the layers above it.
"""
