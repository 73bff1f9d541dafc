"""What every stage shares: labels from folder names, patient-grouped splits, provenance, the BENCHMARKS.md writer."""
