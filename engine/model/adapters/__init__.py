"""Grouped PEFT adapters: every class holds the parameters of all C groups stacked."""
