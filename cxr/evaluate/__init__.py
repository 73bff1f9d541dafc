"""Judging models: metrics and their intervals, calibration, the report, the shortcut probes, grouped cross-validation."""
