"""fedward: federated learning for imbalanced, heterogeneous medical image classification."""

__version__ = "0.1.0"
