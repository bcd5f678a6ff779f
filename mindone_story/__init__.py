"""mindone-story: consistent story visualisation on SDXL in MindSpore (Ascend NPUs and CPUs)."""

__version__ = "0.1.0"
