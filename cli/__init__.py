"""Thin Click layer over `perpeft.engine`."""
