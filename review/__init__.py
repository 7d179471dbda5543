"""The review layer: `sftc diff`, `status`, `runs`, `report` and the git textconv.

It reads bundles and run directories and never writes into them; it is not part of any bundle's
hash, so a change here never changes a bundle id (compiler/bundle.py: HASHED_CODE).
"""
