"""Run monitoring: statistics of a score run's rows, the training reference, drift tests and the per-run HTML page."""
