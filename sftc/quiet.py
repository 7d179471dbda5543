"""Third-party output that sftc knows does not apply, kept off the terminal at its source.

Each entry says why it does not apply. Nothing here hides an error or a warning about the user's
own inputs; a warning that may matter is left alone until sftc can say in its own words whether
it applies.
"""

from __future__ import annotations

import logging
import sys
import warnings

BITSANDBYTES = "bitsandbytes"


def hide_bitsandbytes() -> None:
    """Make bitsandbytes look uninstalled to this process, for commands that never quantize.

    peft imports bitsandbytes whenever it is installed (peft/helpers.py at `import peft`, the LoRA
    dispatchers when an adapter is added), which costs ~3 s and logs "Failed to load CPU
    gemm_4bit_forward ... pip install kernels" even for full and LoRA work. There is no environment
    switch for it in peft or transformers; both ask importlib.util.find_spec, which answers None for
    a name that sys.modules maps to None, and `import bitsandbytes` then raises ImportError, which
    peft catches. Call before peft, trl or transformers' quantizers are imported.
    """
    if BITSANDBYTES not in sys.modules:
        sys.modules[BITSANDBYTES] = None  # type: ignore[assignment]


def allow_bitsandbytes() -> None:
    """Undo hide_bitsandbytes (QLoRA needs the real module): forget peft's cached answers too."""
    if BITSANDBYTES in sys.modules and sys.modules[BITSANDBYTES] is None:
        del sys.modules[BITSANDBYTES]
    import_utils = sys.modules.get("peft.import_utils")
    for name in ("is_bnb_available", "is_bnb_4bit_available"):
        cached = getattr(import_utils, name, None)
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_installed = False


def silence_inapplicable() -> None:
    """Filters for messages sftc knows do not apply to it (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    # An optional faster CPU kernel fetched from the Hub; sftc never downloads at run time, and
    # bitsandbytes falls back to its built-in CPU path, so nothing is missing for correctness.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessages("Failed to load CPU gemm_4bit_forward"))
    # sftc cuts every example to tokenize.max_length itself (and rejects rows whose answer would
    # lose tokens); the tokenizer's model_max_length warning is about feeding the model unchecked ids.
    logging.getLogger("transformers.tokenization_utils_base").addFilter(
        _DropMessages("Token indices sequence length is longer than the specified maximum"))
    # peft (get_peft_model) calls the deprecated name inside transformers; nothing in sftc or the
    # user's spec can change it, and it stops when peft moves to is_activation_checkpointing.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


# Commands that never load a quantized model.
NO_QUANTIZATION = frozenset({"compile", "inspect", "schema", "diff", "textconv", "status", "runs", "report"})


def _bundle_kind(args: list[str]) -> str | None:
    """The parameterization of the bundle among a command's arguments, or None if none is found."""
    import json
    from pathlib import Path

    for arg in args:
        lock = Path(arg) / "bundle.lock.json"
        if not arg.startswith("-") and lock.is_file():
            try:
                return json.loads(lock.read_text(encoding="utf-8"))["spec"]["parameterization"]["kind"]
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


def quiet_for_command(name: str | None, args: list[str]) -> None:
    """Before a CLI command runs: the filters, and bitsandbytes hidden unless the command may
    quantize (`run` of a bundle that is not qlora does not)."""
    silence_inapplicable()
    kind = _bundle_kind(args) if name == "run" else None
    if name in NO_QUANTIZATION or kind in ("full", "lora"):
        hide_bitsandbytes()
