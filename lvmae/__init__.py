"""lvmae: long-video masked autoencoders (VideoMAE + LVMAE) in pure PyTorch."""

__version__ = "0.1.0"
