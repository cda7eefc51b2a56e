"""The float64 reference: the specification every optimized backend must match."""

from reference.attention import attention, textbook_attention
from reference.metadata import AttnKind, StepMetadata
from reference.paged_cache import gather_sequence, write_to_cache
from reference.validation import check_inputs

__all__ = [
    "AttnKind",
    "StepMetadata",
    "attention",
    "check_inputs",
    "gather_sequence",
    "textbook_attention",
    "write_to_cache",
]
