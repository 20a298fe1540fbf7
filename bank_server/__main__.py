"""``python -m bank_server [serve options]``: `fgc-bank serve`, the form torchrun launches
(``torchrun ... -m bank_server --shard auto --rendezvous HOST:PORT``)."""

import sys

from fgc_bank.cli import main

if __name__ == "__main__":
    main(args=["serve", *sys.argv[1:]], prog_name="python -m bank_server")
