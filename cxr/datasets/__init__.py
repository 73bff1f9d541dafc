"""Small public datasets used to prove the from-scratch networks (no downloads: files on disk)."""
