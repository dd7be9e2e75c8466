"""The PerPEFT domain: data, input caches, CLIP encoder with grouped adapters, SASRec, training, evaluation."""
