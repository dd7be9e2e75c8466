"""``python -m perpeft.cli``: the ``perpeft-engine`` command, the form ``torchrun -m perpeft.cli`` starts."""

from perpeft.cli.main import main

main()
