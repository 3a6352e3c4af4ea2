"""A compact decoder-only transformer with cached, batched greedy and beam decoding.

Architecture (LLaMA-like, sized from :class:`lmops.config.ModelConfig`): pre-norm RMSNorm,
rotary position embeddings, SwiGLU MLP, ``scaled_dot_product_attention``, token embedding
tied to the output head, no biases. GPT-2 initialisation: every weight N(0, 0.02), the two
projections that write into the residual stream scaled by 1/sqrt(2 * n_layer) so the
residual variance does not grow with depth.

Decoding keeps a :class:`KVCache` per call. Prompts are left-padded so that every row's next
token sits in the same column; each row carries its own positions (pads excluded) and a key
mask, so a prompt decodes to the same tokens alone or in a padded batch. Attention never
reaches further back than ``block_size`` tokens, the longest distance seen in training; with
rotary embeddings only distances matter, so decoding past ``block_size`` is a sliding window.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmops.config import ModelConfig
from lmops.core.guards import apply_guards
from lmops.errors import DeadlineExceeded

INIT_STD = 0.02
MLP_MULTIPLE = 64  # SwiGLU width rounded up to this, for matmul-friendly shapes
NORM_EPS = 1e-6


def check_deadline(deadline: float | None) -> None:
    """Raise :class:`DeadlineExceeded` once ``time.monotonic()`` is past ``deadline``."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("decoding passed its deadline")


def mlp_hidden(cfg: ModelConfig) -> int:
    """SwiGLU hidden width: ``mlp_ratio * n_embd`` rounded up to a multiple of 64."""
    # round() first so that 8/3 * 192 = 512.0000001 stays 512 rather than becoming 576
    return MLP_MULTIPLE * math.ceil(round(cfg.mlp_ratio * cfg.n_embd) / MLP_MULTIPLE)


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> int:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention.

    N counts the tied embedding once, as the output head (the lookup itself is free);
    attention scores and the weighted sum add 12 * n_layer * n_embd * block_size, without
    discounting the causal mask (the PaLM appendix B convention, also nanoGPT's MFU).
    """
    e, n_layer = cfg.n_embd, cfg.n_layer
    per_layer = 2 * e + 4 * e * e + 3 * e * mlp_hidden(cfg)
    n_params = vocab_size * e + n_layer * per_layer + e
    return 6 * n_params + 12 * n_layer * e * cfg.block_size


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + length) / 6) ** alpha; alpha = 0 turns it off."""
    return ((5 + length) / 6) ** alpha


class KVCache:
    """Keys and values of past tokens, one [B, H, max_len, D] buffer pair per layer.

    ``valid`` [B, max_len] marks which slots hold real tokens (False for left padding). A
    layer's buffers are allocated on its first write, with that write's dtype and device,
    so the cache follows autocast. ``length`` slots are filled; the model advances it.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        valid: Tensor | None = None,
    ):
        self.max_len = max_len
        self.length = 0
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        if valid is not None:
            self.valid[:, : valid.shape[1]] = valid

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, H, T, D] after the filled slots; return all keys and values so far."""
        end = self.length + k.shape[2]
        if self.keys[layer] is None:
            b, h, _, d = k.shape
            self.keys[layer] = k.new_empty(b, h, self.max_len, d)
            self.values[layer] = v.new_empty(b, h, self.max_len, d)
        keys, values = self.keys[layer], self.values[layer]
        assert keys is not None and values is not None  # allocated above
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def reorder(self, rows: Tensor, start: int = 0) -> None:
        """Keep and reorder batch rows (beam reshuffles, dropping finished rows).

        ``start`` > 0 says every row's slots before it already hold what ``rows`` would
        bring there, and their validity too (beams of one prompt share its prompt): only the
        slots from ``start`` to ``length`` are gathered then, in place. The batch size
        must stay the same.
        """
        if start:
            if rows.shape[0] != self.batch_size:
                raise ValueError(f"a partial reorder keeps {self.batch_size} rows, got {len(rows)}")
            for store in (self.keys, self.values):
                for buf in store:
                    if buf is not None:
                        span = buf[:, :, start : self.length]
                        span.copy_(span.index_select(0, rows))
            return
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is not None:
                    # one contiguous row gather, empty slots included: several times faster
                    # than copying only the filled slots through advanced indexing
                    store[i] = buf.index_select(0, rows)
        self.valid = self.valid.index_select(0, rows)


# ------------------------------------------------------------ prepacked weights

# .packs, while a decoding method runs in this thread: {(id(weight), dtype): the weight's
# oneDNN-prepacked copy}, made on first use and dropped when the outermost call ends
_decoding = threading.local()


@functools.cache
def _onednn_linear(dtype: torch.dtype) -> bool:
    """Whether this torch multiplies ``dtype`` with oneDNN-prepacked weights correctly."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)  # not the global generator: training draws from it
    w, x = torch.randn(24, 16, generator=g).to(dtype), torch.randn(3, 16, generator=g).to(dtype)
    with torch.autocast("cpu", enabled=False):
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        except (AttributeError, RuntimeError):  # built without oneDNN, or another signature
            return False
        return torch.allclose(y.float(), x.float() @ w.float().T, atol=0.05)


@contextmanager
def _prepacked_weights() -> Iterator[None]:
    """While decoding, :class:`Linear` layers on the CPU multiply with prepacked weights.

    The copies last one decoding call (the outermost, where calls nest): weights cannot
    change during one, but can between two, and not every change shows. The fused AdamW
    step updates a weight in place without bumping its version counter, so copies kept
    from one validation decode to the next multiplied with the weights of the first.
    Per thread: a served model's concurrent requests, or training beside a decode, each
    see only their own copies.
    """
    outermost = getattr(_decoding, "packs", None) is None
    if outermost:
        _decoding.packs = {}
    try:
        yield
    finally:
        if outermost:
            _decoding.packs = None


class Linear(nn.Linear):
    """``nn.Linear`` that, while a decoding method runs on the CPU, multiplies with a copy
    of its weight prepacked for oneDNN (the kernels ``torch.compile`` uses on the CPU).

    ``F.linear`` on the CPU goes to MKL, which repacks the weight on every call and, on AMD
    CPUs, runs far from the matmul peak: on the 2-core AVX-512 EPYC, [64, 256] x [256,
    8000] took 1.9 ms in fp32 against 0.6 ms prepacked, and 0.55 against 0.30 ms in bf16.
    The copy is made once per weight and dtype in each decoding call, which multiplies
    with it at every step. Training, GPUs and compiled code use ``F.linear``.
    """

    def forward(self, x: Tensor) -> Tensor:
        # is_compiling first: compiled code never reads the thread-local state
        if torch.compiler.is_compiling() or x.device.type != "cpu":
            return super().forward(x)
        packs = getattr(_decoding, "packs", None)
        if packs is None:
            return super().forward(x)
        if torch.is_autocast_enabled("cpu"):
            x = x.to(torch.get_autocast_dtype("cpu"))
        if self.bias is not None or not _onednn_linear(x.dtype):
            return super().forward(x)
        key = (id(self.weight), x.dtype)
        if key not in packs:
            packs[key] = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().to(x.dtype))
        return torch.ops.mkldnn._linear_pointwise(x, packs[key], None, "none", [], "")


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (half-split layout) in x's dtype; cos and sin come in that dtype.

    Under bf16 autocast q and k are already bf16 (rounded once by the qkv matmul); an fp32
    round trip here only added two casts per tensor, forward and backward.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def _use_matmul_attention(q: Tensor, dropout: float) -> bool:
    """Whether a causal pass should use :func:`_matmul_attention` instead of SDPA.

    On the CPU, SDPA's flash kernel in bf16/fp16 is about 3x slower (forward + backward)
    than two batched matmuls and a softmax at the context lengths trained here (128, a
    [T, T] score matrix per head is small); in fp32 and on GPUs SDPA is as fast or faster.
    """
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of q, k, v [B, H, T, D] as baddbmm + softmax + bmm."""
    b, h, t, d = q.shape
    # additive mask: 0 on and below the diagonal, -inf above, in the scores' dtype
    bias = torch.full((t, t), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    scores = torch.baddbmm(
        bias.expand(b * h, t, t),
        q.reshape(b * h, t, d),
        k.reshape(b * h, t, d).transpose(1, 2),
        alpha=d**-0.5,
    )
    # the cpu softmax kernel accumulates reduced-precision inputs in fp32
    return torch.bmm(scores.softmax(-1), v.reshape(b * h, t, d)).view(b, h, t, d)


def _masked_matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of q [B, H, T, D] over k, v [B, H, S, D] where ``mask`` [B, 1, T, S] allows.

    What decoding runs on the CPU: a few queries over the cache. At beam 4 x batch 16 (64
    rows) SDPA's CPU kernel with a mask took 690 us a call in bf16, for one query per row
    over 56 keys, a third of the decoding step; two matmuls and a softmax take about 180
    us (and 15% less than SDPA in fp32). The scores are rounded to the matmul's dtype, as
    in the full bf16 pass (:func:`_matmul_attention`); the softmax runs in fp32.
    """
    if k.dtype == torch.float32:
        scores = torch.matmul(q, k.transpose(-1, -2))
    else:
        # a bf16 batched matmul copies a transposed operand whose rows are strided (the
        # cache's filled slots): transposing the product instead copies nothing
        scores = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2)
    scores = scores.float().mul_(q.shape[-1] ** -0.5).masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None,
        layer: int,
        mask: Tensor | None,
    ) -> Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        (q, k), v = rotate(qkv[:2], cos, sin), qkv[2]  # q and k in one pass: half the ops
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if mask is None and _use_matmul_attention(q, dropout):
            y = _matmul_attention(q, k, v)
        elif mask is not None and q.device.type == "cpu" and dropout == 0.0:
            y = _masked_matmul_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout
            )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden(cfg)
        self.gate_up = Linear(cfg.n_embd, 2 * hidden, bias=False)
        self.down = Linear(hidden, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.drop(self.down(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=NORM_EPS)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=NORM_EPS)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None,
        layer: int,
        mask: Tensor | None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    inv_freq: Tensor  # a buffer, registered in __init__

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=NORM_EPS)
        self.lm_head = Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        head_dim = cfg.n_embd // cfg.n_head
        inv_freq = cfg.rope_theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        # not persistent: derived from the config, so checkpoints need not carry it
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=INIT_STD)
        resid_std = INIT_STD / math.sqrt(2 * self.cfg.n_layer)
        for block in cast("list[Block]", self.blocks):
            nn.init.normal_(block.attn.proj.weight, std=resid_std)
            nn.init.normal_(block.mlp.down.weight, std=resid_std)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count; the tied embedding/output matrix is counted once."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embedding else n

    def new_cache(self, batch_size: int, max_len: int, valid: Tensor | None = None) -> KVCache:
        """An empty cache for this model; ``valid`` [B, T0] marks padding in the first slots."""
        return KVCache(self.cfg.n_layer, batch_size, max_len, self.device, valid)

    def _span_start(self, t: int, cache: KVCache | None) -> int:
        """Slot of the first of ``t`` new tokens; ValueError if they do not fit."""
        start = cache.length if cache is not None else 0
        if cache is None and t > self.cfg.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds block_size {self.cfg.block_size}")
        if cache is not None and start + t > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {t} tokens > max_len {cache.max_len}")
        return start

    def forward(
        self, idx: Tensor, cache: KVCache | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """Logits [B, T, V] for every position of ``idx`` [B, T].

        Without a cache this is a plain causal pass over at most ``block_size`` tokens.
        With one, ``idx`` continues the cached tokens: its keys are stored and attention
        covers the cache (masked by ``cache.valid`` and the ``block_size`` window).
        ``positions`` ([T] or [B, T]) default to the slot indices; left-padded batches
        pass each row's own positions.
        """
        b, t = idx.shape
        start = self._span_start(t, cache)
        if positions is None:
            positions = torch.arange(start, start + t, device=idx.device)
        angles = positions.unsqueeze(-1).float() * self.inv_freq  # [T, D/2] or [B, T, D/2]
        if angles.dim() == 3:
            angles = angles.unsqueeze(1)  # broadcast over heads
        cos, sin = angles.cos(), angles.sin()
        if torch.is_autocast_enabled(idx.device.type):
            # q and k come out of the qkv matmul in the autocast dtype: rotate them in it
            dtype = torch.get_autocast_dtype(idx.device.type)
            cos, sin = cos.to(dtype), sin.to(dtype)

        mask = None
        if cache is not None:
            end = start + t
            query = torch.arange(start, end, device=idx.device).unsqueeze(1)
            key = torch.arange(end, device=idx.device)
            dist = query - key
            causal = (dist >= 0) & (dist < self.cfg.block_size)
            # a pad query attends to itself so its row is never all-masked (NaN)
            mask = (causal & cache.valid[:, None, :end]) | (dist == 0)
            mask = mask.unsqueeze(1)  # [B, 1, T, end]

        x = self.drop(self.tok_emb(idx))
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer, mask)
        if cache is not None:
            cache.length += t
        return self.lm_head(self.norm(x))

    # ------------------------------------------------------------------ decoding

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        # decoding mid-training (validation BLEU) must not see dropout
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _left_pad(self, prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
        """Token ids, positions and validity [B, T] of the left-padded, truncated prompts."""
        if not prompts:
            raise ValueError("no prompts to decode")
        prompts = [list(p[-self.cfg.block_size :]) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        t = max(len(p) for p in prompts)
        idx = torch.full((len(prompts), t), pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, t - len(p) :] = torch.tensor(p, dtype=torch.long)
        n_pad = torch.tensor([t - len(p) for p in prompts]).unsqueeze(1)
        positions = (torch.arange(t) - n_pad).clamp(min=0)
        valid = torch.arange(t) >= n_pad
        return idx.to(self.device), positions.to(self.device), valid.to(self.device)

    @torch.no_grad()
    def generate_greedy(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        eos_id: int,
        pad_id: int,
        min_new_tokens: int = 0,
        deadline: float | None = None,
        no_repeat_ngram_size: int = 0,
        repetition_penalty: float = 1.0,
    ) -> list[list[int]]:
        """Greedy continuation of each prompt: the new tokens only, eos and after removed.

        A row leaves the batch (and the cache) as soon as it emits eos, which it cannot do
        before ``min_new_tokens``; the loop ends when no row is left or after
        ``max_new_tokens``. Past ``deadline`` (a ``time.monotonic()`` value) a step raises
        :class:`~lmops.errors.DeadlineExceeded`. ``no_repeat_ngram_size`` and
        ``repetition_penalty``: see :mod:`lmops.core.guards`.
        """
        guarded = no_repeat_ngram_size > 0 or repetition_penalty != 1.0
        out: list[list[int]] = [[] for _ in prompts]
        with self._eval_mode(), _prepacked_weights():
            idx, positions, valid = self._left_pad(prompts, pad_id)
            if max_new_tokens <= 0:
                return out
            cache = self.new_cache(len(prompts), idx.shape[1] + max_new_tokens, valid)
            logits = self(idx, cache, positions)[:, -1]
            next_pos = positions[:, -1] + 1
            alive = list(range(len(prompts)))
            for step in range(max_new_tokens):
                check_deadline(deadline)
                if step < min_new_tokens:
                    logits[:, eos_id] = -math.inf
                if guarded:
                    history = [out[i] for i in alive]
                    apply_guards(logits, history, no_repeat_ngram_size, repetition_penalty)
                tok = logits.argmax(-1)
                going = []
                for row, (i, t) in enumerate(zip(alive, tok.tolist(), strict=True)):
                    if t != eos_id:
                        out[i].append(t)
                        going.append(row)
                if not going or step == max_new_tokens - 1:
                    break
                if len(going) < len(alive):
                    rows = torch.tensor(going, device=self.device)
                    cache.reorder(rows)
                    tok, next_pos = tok[rows], next_pos[rows]
                    alive = [alive[r] for r in going]
                logits = self(tok[:, None], cache, next_pos[:, None])[:, -1]
                next_pos = next_pos + 1
        return out

    @torch.no_grad()
    def generate_beam(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        eos_id: int,
        pad_id: int,
        beam_size: int = 4,
        length_penalty: float = 1.0,
        min_new_tokens: int = 0,
        deadline: float | None = None,
        no_repeat_ngram_size: int = 0,
        repetition_penalty: float = 1.0,
    ) -> list[list[int]]:
        """Beam search; returns each prompt's best hypothesis (new tokens, eos removed).

        Hypotheses are ranked by sum of log-probs / ((5 + len) / 6) ** length_penalty (GNMT),
        len counting the new tokens including eos; 0 ranks by plain log-prob. All beams of
        all prompts decode together as B * beam_size rows; the cache is reordered as beams
        are reshuffled. A prompt is done once it has ``beam_size`` finished hypotheses that
        no live beam can still beat (an exact bound, not a heuristic), and leaves the batch.
        No hypothesis ends before ``min_new_tokens`` (eos gets log-prob -inf until then).
        Past ``deadline`` (a ``time.monotonic()`` value) a step raises
        :class:`~lmops.errors.DeadlineExceeded`. ``no_repeat_ngram_size`` and
        ``repetition_penalty`` apply to each beam's own tokens (:mod:`lmops.core.guards`).
        """
        if beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {beam_size}")
        k = beam_size

        def normalise(score: float, length: int) -> float:
            return score / gnmt_length_penalty(length, length_penalty)

        out: list[list[int]] = [[] for _ in prompts]
        with self._eval_mode(), _prepacked_weights():
            idx, positions, valid = self._left_pad(prompts, pad_id)
            if max_new_tokens <= 0:
                return out
            b = len(prompts)
            cache = self.new_cache(b, idx.shape[1] + max_new_tokens, valid)
            logits = self(idx, cache, positions)[:, -1]
            rows = torch.arange(b, device=self.device).repeat_interleave(k)
            cache.reorder(rows)
            logits, next_pos = logits[rows], positions[rows, -1] + 1
            # only the first copy of each prompt is live, so step 0 expands one hypothesis
            # into k distinct beams instead of k identical ones
            scores = torch.full((b, k), -math.inf, device=self.device)
            scores[:, 0] = 0.0
            seqs = torch.empty(b * k, 0, dtype=torch.long)  # tokens so far, on the cpu
            finished: list[list[tuple[float, list[int]]]] = [[] for _ in prompts]
            alive = list(range(b))
            for step in range(max_new_tokens):
                check_deadline(deadline)
                length, last = step + 1, step == max_new_tokens - 1
                vocab = logits.shape[-1]
                logits = logits.float()
                if no_repeat_ngram_size > 0 or repetition_penalty != 1.0:
                    history = seqs.tolist()
                    apply_guards(logits, history, no_repeat_ngram_size, repetition_penalty)
                logp = logits.log_softmax(-1)
                if step < min_new_tokens:
                    logp[:, eos_id] = -math.inf
                cand = scores.unsqueeze(-1) + logp.view(-1, k, vocab)
                top, top_idx = cand.view(len(alive), k * vocab).topk(2 * k, dim=1)
                top, top_idx = top.tolist(), top_idx.tolist()
                new_rows, new_tok, new_scores, going = [], [], [], []
                for a, i in enumerate(alive):
                    # (row, token, score) of the next beams, best first
                    picked: list[tuple[int, int, float]] = []
                    for rank, (s, j) in enumerate(zip(top[a], top_idx[a], strict=True)):
                        if s == -math.inf:
                            break
                        row, t = a * k + j // vocab, j % vocab
                        if t == eos_id:
                            # an eos outside the top k would not have been in the beam
                            if rank < k:
                                finished[i].append((normalise(s, length), seqs[row].tolist()))
                        elif len(picked) < k:
                            picked.append((row, t, s))
                    if last:
                        finished[i] += [
                            (normalise(s, length), seqs[r].tolist() + [t]) for r, t, s in picked
                        ]
                        continue
                    best = sorted((f[0] for f in finished[i]), reverse=True)[:k]
                    if not picked:
                        continue
                    # live beams only lose log-prob, so their best reachable score is this,
                    # at one end or the other of the lengths still possible
                    reachable = max(
                        normalise(picked[0][2], length), normalise(picked[0][2], max_new_tokens)
                    )
                    if len(best) == k and best[-1] >= reachable:
                        continue
                    picked += [(picked[0][0], pad_id, -math.inf)] * (k - len(picked))
                    going.append(i)
                    for row, t, s in picked:
                        new_rows.append(row)
                        new_tok.append(t)
                        new_scores.append(s)
                if not going:
                    break
                rows = torch.tensor(new_rows)
                seqs = torch.cat([seqs[rows], torch.tensor(new_tok).unsqueeze(1)], dim=1)
                rows = rows.to(self.device)
                # the same prompts in the same order: each row's new beam is one of its own
                # prompt's, whose prompt slots are its own already
                cache.reorder(rows, start=idx.shape[1] if going == alive else 0)
                next_pos = next_pos[rows]
                scores = torch.tensor(new_scores, device=self.device).view(len(going), k)
                alive = going
                tok = torch.tensor(new_tok, device=self.device)
                logits = self(tok[:, None], cache, next_pos[:, None])[:, -1]
                next_pos = next_pos + 1
            for i, hyps in enumerate(finished):
                out[i] = max(hyps, key=lambda h: h[0])[1]
        return out
