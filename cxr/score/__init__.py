"""The score stage: worker-side inference on files (frames), the lease that keeps one run per output (lease).

The Spark orchestration lives in cxr/spark/score.py; nothing here needs a SparkSession.
"""
