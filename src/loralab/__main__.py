"""``python -m loralab``: the same command line, for torchrun / accelerate launch (``torchrun ... -m loralab train``)."""

from loralab.cli import main

if __name__ == "__main__":
    main()
