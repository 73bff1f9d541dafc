"""Image code that runs anywhere (no Spark): decoding, enhancement, the per-image pipeline."""
