"""``python -m loralab.cli``: the same as the ``loralab`` command."""

from loralab.cli import main

main()
