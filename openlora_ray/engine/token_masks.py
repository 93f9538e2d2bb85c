"""Applying constrained rows' token bitmasks to a step's logits, in plain torch.

The grammar library fills one int32 bitmask row per constrained row on the host; the rows are
unpacked with a 256-entry byte table (one gather, no per-token Python) and copied to the logits'
device once, and only the constrained rows of the batch are touched. Plain torch rather than the
libraries' ``torch.compile`` kernels: those need a C++ compiler at run time and a cold compile of
seconds, and the eager unpack measured within tens of microseconds of them per row on CPU
(see the README's structured output section).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openlora_ray.engine.constraints import ConstraintError, TokenConstraint

# _BITS[b] = the 8 bits of byte b, lowest first: bytes of a little-endian int32 word in memory
# order are its bits 0-7, 8-15, ... so a byte view of the mask unpacks in token order.
_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()


def allowed_tokens(constraints: Sequence[TokenConstraint], vocab: int) -> torch.Tensor:
    """(len(constraints), vocab) bool on the host: each row's allowed next tokens."""
    words = (vocab + 31) // 32
    bitmask = torch.zeros((len(constraints), words), dtype=torch.int32)
    for row, constraint in enumerate(constraints):
        constraint.fill_bitmask(bitmask, row)
    return _BITS[bitmask.view(torch.uint8).long()].reshape(len(constraints), words * 32)[:, :vocab]


def apply_constraints(logits: torch.Tensor, constraints: Sequence[TokenConstraint | None]) -> None:
    """Set every token a row's constraint forbids to -inf in ``logits`` (B, V), in place.

    Raises ``ConstraintError`` when some row has no token left (``sample_rows`` then samples row
    by row, so that only that row fails): one device-to-host read per step with constrained rows."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    allowed = allowed_tokens([constraints[i] for i in rows], logits.shape[1])
    index = torch.tensor(rows, device=logits.device)
    masked = logits[index].masked_fill(~allowed.to(logits.device, non_blocking=True), float("-inf"))
    if bool(torch.isneginf(masked).all(-1).any()):  # nothing left: the grammar, or it with min_tokens/bias
        raise ConstraintError("the output constraint allows no next token here (a dead end of its grammar)")
    logits[index] = masked
