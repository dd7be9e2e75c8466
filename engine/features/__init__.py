"""Cached item features: tokens and pixels per catalog, CLIP hidden states for IISAN."""
