"""``python -m trainer``: the same command as ``fgc-train``."""

from trainer.cli import main

if __name__ == "__main__":
    main()
