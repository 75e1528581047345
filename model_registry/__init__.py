"""The model lifecycle: validation rows, export to packages, the `Predictor`, the registry and its
promotion gate. Serving depends on this package, never on the training driver."""
