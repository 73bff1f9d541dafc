"""Showing what a model and the preprocessing do: Grad-CAM heatmaps and overlays, Figure 1 panels, sample sheets."""
