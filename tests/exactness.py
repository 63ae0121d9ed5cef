"""The exactness check lives in the library (the demo uses it too)."""
from lorasuite_core.testing.verification import load_token_map, logits_over_shared_vocab, relative_max_error

__all__ = ["load_token_map", "logits_over_shared_vocab", "relative_max_error"]
