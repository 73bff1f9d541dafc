"""Model builders (Keras) and the one place models are saved and loaded (Keras and cxr.nn)."""
