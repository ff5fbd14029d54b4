"""Model architectures, builders and the export wrapper."""

from sq_pt2e.models.build import CTCLogits, build_model, load_model, to_ctc_logits
from sq_pt2e.models.configs import ARCHITECTURES, make_config
from sq_pt2e.models.vocab import BLANK_ID, VOCAB, vocab_dict

__all__ = [
    "ARCHITECTURES",
    "BLANK_ID",
    "CTCLogits",
    "VOCAB",
    "build_model",
    "load_model",
    "make_config",
    "to_ctc_logits",
    "vocab_dict",
]
