"""Sample data: the synthetic CXR-like archive (synth) and MNIST for the from-scratch networks (no downloads)."""
