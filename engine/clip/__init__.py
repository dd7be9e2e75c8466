"""The frozen CLIP backbone: loading, input preprocessing, the shipped tiny CLIP, faster layer rewrites."""
