"""Reading the preprocess job's Parquet output into NumPy for training and driver-side checks."""
