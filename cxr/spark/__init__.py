"""Everything that needs Spark lives here; the image and model code elsewhere in cxr runs without a cluster."""
