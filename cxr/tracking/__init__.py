"""MLflow for the jobs: runs that mirror the JSON records every job already writes, and the model registry.

Only the driver imports MLflow (lazily, when tracking is on); the executors never need it.
"""
