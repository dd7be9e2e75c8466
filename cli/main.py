"""The `perpeft-engine` command."""

import click


@click.group()
def cli() -> None:
    """PerPEFT: personalized PEFT of CLIP for multimodal sequential recommendation."""
