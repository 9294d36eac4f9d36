"""TRL's chunked LM head: what a step holds where the loss never sees the full logits.

From TRL 1.15, the SFT and DPO trainers (``add_fused_lm_head``) take per-token
log-probabilities from ``_ChunkedLogProbFunction``: the head's matmul runs on tiles of at
most 4,096 tokens x 32,768 vocabulary entries in one reused buffer, folded into fp32
statistics per token, and the backward recomputes each tile. No batch x sequence x
vocabulary tensor exists. On CUDA a Triton kernel folds each tile in place; elsewhere
torch ops fold it, with fp32 temporaries of the whole tile.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_TILE = 4096
"""Tokens per tile (TRL's ``TOKEN_CHUNK_SIZE``)."""
VOCAB_TILE = 32768
"""Vocabulary entries per tile (``_CHUNKED_LOGPROB_CHUNK_SIZE``): the buffer is this wide
whatever the vocabulary."""
CPU_TILE = (13, 29)
"""Bytes per tile element of the torch fold's temporaries (forward, backward): fp32
copies of the tile, its exponentials, masks and gradient. Read from the function run
alone on the CPU (the same for bf16 and fp32 tiles)."""
CPU_SOFTCAP = 4
"""Bytes per tile element more in that backward where the logits are soft-capped (Gemma 2's
``cap * tanh(z / cap)``: the tanh's output is kept)."""
ROW_FORWARD = 48
"""Bytes per scored token while the forward folds: seven fp32 statistics and the outputs."""
ROW_KEPT = 32
"""Bytes per scored token from the forward to the backward: the targets (int64), the
saved log-normaliser and entropy, the outputs scattered back and the label mask."""
FP32 = 4


@dataclass(frozen=True)
class ChunkedHead:
    """The head's bytes: ``kept`` from its forward to its backward, and the transients
    of its ``forward`` and ``backward`` on top of them."""

    kept: int
    forward: int
    backward: int


def chunked_head(batch: int, seq_len: int, hidden: int, vocab: int, *, hidden_bytes: int,
                 compute: int, weight_bytes: int, head_trains: bool, cuda: bool,
                 softcap: bool = False) -> ChunkedHead:
    """The chunked head of a step of ``batch`` x ``seq_len`` tokens.

    ``hidden_bytes``: the final norm's output width, which the head saves (all of it: the
    scored positions are a view of it); ``compute``: the tile's width (the autocast dtype,
    else the inputs'); ``weight_bytes``: the head weight's; ``head_trains``: its gradient
    is made (full tuning), in fp32 then cast to the weight's dtype; ``softcap``: the
    logits are soft-capped.
    """
    rows = batch * (seq_len - 1)  # positions with a next token (all scored: an upper bound)
    n, tile_width = min(rows, TOKEN_TILE), min(vocab, VOCAB_TILE)
    tile = n * tile_width
    buffer = n * VOCAB_TILE * compute
    # CUDA gathers the scored positions; elsewhere a batch of several is reshaped (a copy)
    gathered = rows * hidden * hidden_bytes if cuda or batch > 1 else 0
    hidden_cast = n * hidden * compute if hidden_bytes != compute else 0
    weight_cast = tile_width * hidden * compute if weight_bytes != compute else 0
    backward_fold = CPU_TILE[1] + (CPU_SOFTCAP if softcap else 0)
    fold = (0, 0) if cuda else (tile * CPU_TILE[0], tile * backward_fold)
    weight_grad = vocab * hidden * FP32 if head_trains else 0
    # the backward returns its fp32 gradients cast to their inputs' dtypes, with the
    # buffer still held; on the CPU its fold's temporaries are the larger
    returned = (rows * hidden * hidden_bytes if hidden_bytes != FP32 else 0) + (
        vocab * hidden * weight_bytes if head_trains and weight_bytes != FP32 else 0)
    return ChunkedHead(
        kept=seq_len * batch * hidden * hidden_bytes + gathered + rows * ROW_KEPT,
        forward=buffer + hidden_cast + rows * ROW_FORWARD + max(fold[0], weight_cast),
        backward=buffer + hidden_cast + weight_cast + rows * (hidden * FP32 + FP32)
        + weight_grad + max(fold[1], returned))
