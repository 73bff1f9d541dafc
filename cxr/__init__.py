"""cxr-spark: chest X-ray archives to COVID-19 / viral pneumonia / normal calls, on Apache Spark."""

CLASSES = ("COVID", "NORMAL", "VIRAL")
__version__ = "0.1.0"
