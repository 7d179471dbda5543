"""`python -m sftc ...`: the same CLI as the `sftc` console script."""

from sftc.cli import main

main()
