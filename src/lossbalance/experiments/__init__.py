"""The studies: data, models, training loops and reports (not imported by the library)."""
