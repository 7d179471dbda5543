"""The compiler: spec -> data -> split -> template -> tokens -> pack -> budget -> model -> bundle.

Each pass is a module named for its job; `compile_spec` runs them in order.
"""


def compile_spec(spec_path, bundles_dir=None, force=False, progress=False, workers=None):
    """Compile a spec into a locked bundle; returns (bundle dir, lock, reused)."""
    from sftc.compiler.bundle import compile_spec as _compile

    return _compile(spec_path, bundles_dir=bundles_dir, force=force, progress=progress, workers=workers)
