"""What the scheduler hands the runner for one step: plain data, no model, no kernels.

Contract: :class:`WorkItem` names one sequence and how many of its next tokens the step computes. The scheduler
builds them (pages already allocated), the runner reads them, the engine commits them; this module is all the
three share, so scheduling policy never imports the model.
"""

from __future__ import annotations

import dataclasses

from ..cache.protocol import CachedSequence


@dataclasses.dataclass(kw_only=True)
class WorkItem:
    """One sequence's part of a step: tokens ``[seq.num_computed, seq.num_computed + num_tokens)``."""

    seq: CachedSequence
    num_tokens: int
    want_logits: bool     # the step ends at the sequence's last known token: its logits pick the next one
