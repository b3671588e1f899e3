"""Judging frozen representations: feature extraction and cache, the probes, and the run-level glue."""
