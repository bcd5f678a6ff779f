"""Attention processors, MindSpore: StoryDiffusion's consistent self-attention with its id bank and draws, and
Story-Adapter's global reference cross-attention (the per-round reference encoder and its K/V)."""
