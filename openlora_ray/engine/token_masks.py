"""Applying constrained rows' token bitmasks to a step's logits, in plain torch.

The grammar library fills one int32 bitmask row per constrained row on the host; the bitmask goes
to the logits' device and is unpacked there with one shift per bit (no per-token Python), and
only the constrained rows of the batch are touched. Plain torch rather than the
libraries' ``torch.compile`` kernels: those need a C++ compiler at run time and a cold compile of
seconds, and the eager unpack measured within tens of microseconds of them per row on CPU
(see the README's structured output section).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openlora_ray.engine.constraints import ConstraintError, TokenConstraint


def bitmasks(constraints: Sequence[TokenConstraint], vocab: int) -> torch.Tensor:
    """(len(constraints), ceil(vocab / 32)) int32 on the host: each row's allowed next tokens."""
    bitmask = torch.zeros((len(constraints), (vocab + 31) // 32), dtype=torch.int32)
    for row, constraint in enumerate(constraints):
        constraint.fill_bitmask(bitmask, row)
    return bitmask


def forbidden_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(R, vocab) bool: True where the bit of the token is clear (bit ``t % 32`` of word ``t // 32``)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return (((bitmask.unsqueeze(-1) >> shifts) & 1) == 0).reshape(bitmask.shape[0], -1)[:, :vocab]


def apply_constraints(logits: torch.Tensor, constraints: Sequence[TokenConstraint | None]) -> None:
    """Set every token a row's constraint forbids to -inf in ``logits`` (B, V), in place.

    Only the bitmask (V / 8 bytes a row) crosses to the logits' device; it is unpacked there.
    Raises ``ConstraintError`` when some row has no token left (``sample_rows`` then samples row
    by row, so that only that row fails): one device-to-host read per step with constrained rows.
    """
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    vocab = logits.shape[1]
    bitmask = bitmasks([constraints[i] for i in rows], vocab).to(logits.device, non_blocking=True)
    forbidden = forbidden_tokens(bitmask, vocab)
    every = len(rows) == logits.shape[0]
    index = None if every else torch.tensor(rows, device=logits.device)
    masked = logits if every else logits[index]  # a copy, written back below
    masked.masked_fill_(forbidden, float("-inf"))
    if bool((masked.amax(-1) == float("-inf")).any()):  # nothing left: the grammar, or it with min_tokens
        raise ConstraintError("the output constraint allows no next token here (a dead end of its grammar)")
    if index is not None:
        logits[index] = masked
