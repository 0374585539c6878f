"""From a video to per-frame FLAME-like controls and FFHQ-aligned crops."""
