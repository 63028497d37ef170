"""Self-supervised priors trained by fedward (MoCo-v2), saved in the MoCo checkpoint format."""

from fedward.selfsup.moco import MocoSettings, train_moco

__all__ = ["MocoSettings", "train_moco"]
