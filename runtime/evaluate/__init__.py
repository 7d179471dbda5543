"""Held-out evaluation of a model: the rules file, scoring, generation and eval loss, one module each.

    rules.py     the rules-file model and its loader (docs/eval-rules.md)
    score.py     each declared check per reply, and the metrics over rows
    generate.py  greedy replies to the eval prompts, scored: the behaviour metrics
    loss.py      token-weighted held-out loss over the eval token file
    held_out.py  all of the above at a checkpoint, with the RNG left as it was

The names below are the package's public API, so callers need not know which module holds what.
"""

from sftc.runtime.evaluate.generate import (behaviour_metrics, decode_reply, generate_ids, generate_replies,
                                            stop_token_ids)
from sftc.runtime.evaluate.rules import RESERVED_NAMES, RULES_VERSION, Rules, RulesError, RulesFile, load_rules, \
    load_rules_text, row_problems
from sftc.runtime.evaluate.score import aggregate, parse_json_reply, score

__all__ = ["RESERVED_NAMES", "RULES_VERSION", "Rules", "RulesError", "RulesFile", "aggregate", "behaviour_metrics",
           "decode_reply", "generate_ids", "generate_replies", "load_rules", "load_rules_text", "parse_json_reply",
           "row_problems", "score", "stop_token_ids"]
