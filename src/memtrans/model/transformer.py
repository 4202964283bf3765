"""The Memorizing Transformer: a pre-norm decoder-only transformer with a Transformer-XL cache in every
layer and kNN memory in the layers named by `ModelConfig.memory_layers`.

    model = MemorizingTransformer(cfg)
    state = model.init_state(batch_size=4)          # XL caches + memories, one slot per document
    logits, state = model(tokens, state)            # tokens [B, T], T <= segment_len
    state = model.reset_state(state, slots=[0, 2])  # a new document starts in slots 0 and 2

With `memory_layers=()` it is a Transformer-XL with everything else identical. A memory layer whose
memory is empty outputs the memory term 0, i.e. `(1 - g) * V_local` for the paper's gate.

Incremental use (generation): `logits, state = model.extend(tokens, state)` consumes tokens of any length
and alignment. Segments fill exactly as in `forward` over segment_len-sized chunks: the current partial
segment's keys/values are kept in `state.window` (XL cache + the segment so far), every new query retrieves
from memory, and only when the segment is complete is it written to memory and becomes the XL cache. So
extending one token at a time gives the logits of one teacher-forced forward over the same tokens.
`model.generate(prompt, state, max_new_tokens, ...)` streams a prompt and samples a continuation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from memtrans.config import ModelConfig
from memtrans.memory import MemoryBackend, make_memory
from memtrans.memory.base import device_mask, host_slots
from memtrans.model.attention import Attention, KVWindow
from memtrans.model.layers import FeedForward, RMSNorm


@dataclass
class ModelState:
    """What carries from one segment to the next, per document slot."""

    xl: list  # per layer: (keys, values) [B, H, T_prev, D] of the previous segment, or None
    xl_valid: torch.Tensor | None  # [B, T_prev] bool: False for slots whose document just started
    positions: torch.Tensor  # [B] long: tokens of the current document already seen per slot
    memories: dict[int, MemoryBackend] = field(default_factory=dict)  # layer index -> memory
    # A partial segment consumed by `extend` (not yet written to memory nor rolled into the XL cache):
    # per layer the local window (a KVWindow: keys, values [B, H, T_prev + segment_len, D] allocated once per
    # segment, of which T_prev + pending_len are filled: XL cache + the segment so far), its validity
    # [B, T_prev + segment_len] (the unfilled part True), and the number of tokens of the segment so far.
    window: list | None = None
    window_valid: torch.Tensor | None = None
    pending_len: int = 0
    # Host flag: some slot's XL cache may be invalid (a slot was reset since the last full segment), so the
    # local attention masks it; otherwise the mask is skipped without reading xl_valid (no device sync).
    xl_masked: bool = False

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def state_dict(self) -> dict:
        pair = lambda c: None if c is None else (c[0].cpu(), c[1].cpu())
        copy = lambda c: None if c is None else (c[0].to("cpu", copy=True), c[1].to("cpu", copy=True))
        return {"xl": [pair(c) for c in self.xl],
                "xl_valid": None if self.xl_valid is None else self.xl_valid.cpu(),
                "positions": self.positions.cpu(),
                "memories": {i: m.state_dict() for i, m in self.memories.items()},
                # the filled part only, copied out of the buffers: [B, H, T_prev + pending_len, D] per layer,
                # validity [B, T_prev + pending_len]
                "window": None if self.window is None else [copy(w.filled_kv()) for w in self.window],
                "window_valid": None if self.window_valid is None else
                self.window_valid[:, :self._filled()].to("cpu", copy=True),
                "pending_len": self.pending_len}

    def _filled(self) -> int:
        return self.window[0].filled if self.window else 0


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = Attention(cfg, layer)
        self.norm2 = RMSNorm(cfg.dim)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim or 4 * cfg.dim, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, xl, xl_valid, memory, positions, diagnostics, write_memory=True):
        h, new_xl = self.attn(self.norm1(x), xl, xl_valid, memory, positions, diagnostics, write_memory)
        x = x + self.dropout(h)
        return x + self.ffn(self.norm2(x)), new_xl


class MemorizingTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.blocks:  # residual projections scaled down with depth (GPT-2)
            for w in (block.attn.proj.weight, block.ffn.down.weight):
                nn.init.normal_(w, std=0.02 / (2 * cfg.depth) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def init_state(self, batch_size: int) -> ModelState:
        return ModelState(xl=[None] * self.cfg.depth, xl_valid=None,
                          positions=torch.zeros(batch_size, dtype=torch.long, device=self.device),
                          memories={i: make_memory(self.cfg, batch_size, self.device) for i in self.cfg.memory_layers})

    def reset_state(self, state: ModelState, slots) -> ModelState:
        """A new document starts in `slots` (indices, or a bool mask [B]): clear their XL cache and memories.

        Host slots (a list, a CPU tensor such as the stream's `batch.new_doc`) cost a few fills on the device
        and no transfer; a mask on the device is applied as masked operations, never read on the host."""
        B = state.batch_size
        on_device = isinstance(slots, torch.Tensor) and not self._reads_on_host(slots.device)
        host = None if on_device else host_slots(slots, B)
        if host is None and state.pending_len:  # decoding (extend) only: which slots matters on the host
            host = host_slots(slots.cpu(), B)
        if host is not None and not host:
            return state  # no document starts (most steps)
        if state.pending_len:
            if len(host) < B:
                raise ValueError(f"cannot reset some slots while a partial segment of {state.pending_len} tokens "
                                 f"is pending (model.extend); reset all slots or finish the segment first")
            state.window, state.window_valid, state.pending_len = None, None, 0  # every slot starts afresh
        if host is None:
            mask = device_mask(slots, B, self.device)
            if state.xl_valid is not None:
                state.xl_valid = state.xl_valid & ~mask[:, None]
            state.positions = state.positions.masked_fill(mask, 0)
        else:
            for b in host:
                if state.xl_valid is not None:
                    state.xl_valid[b:b + 1].fill_(False)
                state.positions[b:b + 1].zero_()
        state.xl_masked = state.xl_valid is not None
        for memory in state.memories.values():
            memory.reset(slots if host is None else host)
        return state

    def load_state(self, d: dict, batch_size: int | None = None) -> ModelState:
        """Rebuild a ModelState from `ModelState.state_dict()` (e.g. to resume mid-document)."""
        state = self.init_state(batch_size or d["positions"].shape[0])
        if d["positions"].shape[0] != state.batch_size:
            raise ValueError(f"saved state has {d['positions'].shape[0]} slots, expected {state.batch_size}")
        if set(d["memories"]) != set(state.memories):
            raise ValueError(f"saved state has memory layers {sorted(d['memories'])}, "
                             f"this model has {sorted(state.memories)}")
        dev = self.device
        state.xl = [None if c is None else (c[0].to(dev), c[1].to(dev)) for c in d["xl"]]
        state.xl_valid = None if d["xl_valid"] is None else d["xl_valid"].to(dev)
        state.xl_masked = d["xl_valid"] is not None and not bool(d["xl_valid"].all())  # read on the host, once
        state.positions = d["positions"].to(dev)
        for i, m in state.memories.items():
            m.load_state_dict(d["memories"][i])
        if d.get("window") is not None:  # a partial segment consumed by extend (absent in older checkpoints)
            state.pending_len = int(d["pending_len"])
            kv = [None if c is None else (c[0].to(dev), c[1].to(dev)) for c in d["window"]]
            filled = next((c[0].shape[2] for c in kv if c is not None), 0)
            self._open_window(state, [c if c is None or c[0].shape[2] else None for c in kv],
                              None if d["window_valid"] is None else d["window_valid"].to(dev),
                              filled + self.cfg.segment_len - state.pending_len)
        return state

    def _open_window(self, state: ModelState, prefix: list, prefix_valid: torch.Tensor | None, capacity: int):
        """Per layer a KVWindow of `capacity` starting with prefix[i] (keys, values) or empty, and one validity
        buffer [B, capacity]: prefix_valid (True where None) and True for the tokens to come."""
        state.window = [KVWindow(capacity, p) for p in prefix]
        valid = torch.ones(state.batch_size, capacity, dtype=torch.bool, device=self.device)
        if prefix_valid is not None:
            valid[:, :prefix_valid.shape[1]].copy_(prefix_valid)
        state.window_valid = valid

    def forward(self, tokens: torch.Tensor, state: ModelState | None = None, diagnostics: dict | None = None):
        """tokens [B, T] -> (logits [B, T, vocab] float32, state advanced by T tokens).

        The T tokens are one segment: retrieval for all of them, then they are written to memory and become
        the XL cache. If `diagnostics` is a dict, each memory layer i fills `diagnostics[i]`
        (see Attention._diagnose).
        """
        B, T = tokens.shape
        self._check_tokens(tokens)
        if T > self.cfg.segment_len:
            raise ValueError(f"segment of {T} tokens is longer than segment_len={self.cfg.segment_len}")
        if state is None:
            state = self.init_state(B)
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} slots but tokens have batch size {B}")
        if state.pending_len:
            raise ValueError(f"the state holds a partial segment of {state.pending_len} tokens from model.extend; "
                             f"continue it with model.extend")
        xl = state.xl if self.cfg.xl_cache else [None] * self.cfg.depth
        xl_valid = state.xl_valid if state.xl_masked else None
        logits, new_xl = self._blocks(tokens, state, xl, xl_valid, diagnostics, write_memory=True)
        state.xl = new_xl if self.cfg.xl_cache else [None] * self.cfg.depth
        state.xl_valid = torch.ones(B, T, dtype=torch.bool, device=tokens.device) if self.cfg.xl_cache else None
        state.xl_masked = False
        state.positions = state.positions + T
        return logits, state

    # Whether the model reads tensors on the host: token ids range-checked with a ValueError, reset masks turned
    # into slot indices. None = for CPU tensors only. On other devices a read would synchronise every step, so
    # there token ids get an asynchronous device assert (torch._assert_async: the run stops with a CUDA error
    # naming model.vocab_size where torch can) and a reset mask is applied by masked device ops.
    # False runs the device code on CPU too (tests/test_gpu_ready.py).
    host_reads: bool | None = None

    def _reads_on_host(self, device: torch.device) -> bool:
        return device.type == "cpu" if self.host_reads is None else self.host_reads

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        """Token ids must be integers in [0, vocab_size) (else a ValueError, not an IndexError from the embedding)."""
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens: expected integer token ids, got dtype {tokens.dtype}")
        if tokens.numel() and not self._reads_on_host(tokens.device):
            if tokens.device.type != "meta":
                ok = ((tokens >= 0) & (tokens < self.cfg.vocab_size)).all()
                torch._assert_async(ok, f"tokens: ids must lie in [0, model.vocab_size={self.cfg.vocab_size}); "
                                        f"encode text with the run's tokenizer (or set model.vocab_size to the tokenizer's)")
        elif tokens.numel():
            lo, hi = (int(v) for v in torch.aminmax(tokens))
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"tokens: ids must lie in [0, model.vocab_size={self.cfg.vocab_size}), got "
                                 f"{hi if hi >= self.cfg.vocab_size else lo}; encode text with the run's tokenizer "
                                 f"(or set model.vocab_size to the tokenizer's)")

    def _blocks(self, tokens, state, prefix, prefix_valid, diagnostics, write_memory):
        """Run every block over tokens [B, T] whose local window is preceded by prefix[i] (keys, values) or
        None; returns (logits, per layer (k, v) of these T tokens)."""
        T = tokens.shape[1]
        positions = state.positions[:, None] + torch.arange(T, device=tokens.device)[None, :]  # [B, T]
        x = self.embed(tokens)
        kvs = []
        for i, block in enumerate(self.blocks):
            layer_diag = None
            if diagnostics is not None and i in state.memories:
                layer_diag = diagnostics.setdefault(i, {})
            p = prefix[i]
            x, kv = block(x, p, prefix_valid if p is not None else None, state.memories.get(i), positions,
                          layer_diag, write_memory)
            kvs.append(kv)
        return self.head(self.norm(x)).float(), kvs

    def extend(self, tokens: torch.Tensor, state: ModelState | None = None, diagnostics: dict | None = None):
        """tokens [B, T], any T >= 1 -> (logits [B, T, vocab] float32, state advanced by T tokens).

        Consumes tokens exactly as `forward` over consecutive segment_len chunks of the document would,
        wherever the state stands inside a segment: each query attends to the XL cache and to the current
        segment up to itself and retrieves from memory before the segment is written; a segment is written
        to memory and becomes the XL cache once its segment_len tokens are in. A partial segment stays in
        `state.window` (call `forward` again only after it completes). `diagnostics` describes the last
        chunk (the tokens after the last segment boundary crossed).
        """
        return self._extend(tokens, state, diagnostics, check=True)

    def _extend(self, tokens, state, diagnostics, check: bool):
        """extend; `check=False` skips the token id check (generate's sampled ids lie in range by construction)."""
        B, T = tokens.shape
        if check:
            self._check_tokens(tokens)
        if state is None:
            state = self.init_state(B)
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} slots but tokens have batch size {B}")
        if T == 0:
            raise ValueError("extend needs at least one token")
        S = self.cfg.segment_len
        out, start = [], 0
        while start < T:
            n = min(T - start, S - state.pending_len)
            chunk = tokens[:, start:start + n]
            if diagnostics is not None:
                diagnostics.clear()
            if state.pending_len == 0 and n == S:  # a whole segment: the training forward itself
                logits, state = self.forward(chunk, state, diagnostics)
            else:
                logits = self._extend_partial(chunk, state, diagnostics)
            out.append(logits)
            start += n
        return (out[0] if len(out) == 1 else torch.cat(out, 1)), state

    def _extend_partial(self, tokens, state, diagnostics):
        B, n = tokens.shape
        S, depth = self.cfg.segment_len, self.cfg.depth
        if state.window is None:  # a segment starts: its window begins with the previous segment (XL cache)
            xl = state.xl if self.cfg.xl_cache else [None] * depth
            prev = next((c[0].shape[2] for c in xl if c is not None), 0)
            self._open_window(state, list(xl), state.xl_valid if prev else None, prev + S)
        # Every block writes its n keys/values into its window in place and attends over the filled part.
        filled = state._filled() + n
        window_valid = state.window_valid[:, :filled] if state.xl_masked else None
        logits, _ = self._blocks(tokens, state, state.window, window_valid, diagnostics, write_memory=False)
        state.pending_len += n
        state.positions = state.positions + n
        if state.pending_len == S:  # the segment is complete: write it to memory, roll the XL cache
            seg = [(w.keys[:, :, -S:].contiguous(), w.values[:, :, -S:].contiguous()) for w in state.window]
            seg_positions = state.positions[:, None] - S + torch.arange(S, device=tokens.device)[None, :]
            for i, memory in state.memories.items():
                memory.add(seg[i][0], seg[i][1], seg_positions)
            state.xl = seg if self.cfg.xl_cache else [None] * depth
            state.xl_valid = torch.ones(B, S, dtype=torch.bool, device=tokens.device) if self.cfg.xl_cache else None
            state.xl_masked = False
            state.window, state.window_valid, state.pending_len = None, None, 0
        return logits

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, state: ModelState | None = None, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 stop=None, generator: torch.Generator | None = None, retrievals: list | None = None,
                 progress=None, stop_every: int | None = None):
        """Stream the prompt `tokens` [B, T] (T >= 1) through the model, then sample up to `max_new_tokens`.

        Returns (new tokens [B, n] long, state). The prompt goes in segment by segment exactly as in training
        (wherever `state` stands: a fresh state starts a document); then each sampled token is fed back with
        `extend`, so the logits are those of one teacher-forced forward over prompt + continuation. The
        returned state has consumed every prompt and generated token (calling generate again continues the
        document). Sampling: `temperature=0` is greedy (argmax); otherwise softmax(logits / temperature)
        restricted to the `top_k` most likely tokens and/or the smallest set whose mass reaches `top_p`,
        drawn with `generator` (seeded: reproducible). `stop` (a token id or a collection of ids) ends
        generation once every row has produced one (rows that stopped earlier keep being sampled; cut them
        at their first stop token). Whether every row has stopped is read on the host every `stop_every`
        tokens: None = every token where the model reads tensors on the host (CPU), every 16 on a device, where
        each read waits for the device. The tokens returned are the same either way (cut after the token at
        which the last row stopped), but on a device the state may then have consumed up to 15 tokens past
        them (`state.positions` counts them); `stop_every=1` keeps it exact at one host read per token.
        `retrievals`, if a list, receives per generated token
        {layer: {"positions": [B, H, k] long, "weights": [B, H, k], "share": [B, H], "gate": [H] | None}}:
        what each memory layer retrieved for the query that predicted the token (document positions, -1
        where invalid; the attention weight of each entry) and the share of the head output from memory.
        `progress(n)` is called with the number of prompt tokens consumed after each prompt segment.
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"the prompt must be a [batch, length >= 1] tensor of token ids, got shape {tuple(tokens.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        if stop_every is not None and stop_every < 1:
            raise ValueError(f"stop_every must be >= 1, got {stop_every}")
        B, T = tokens.shape
        state = self.init_state(B) if state is None else state
        stop_ids = None
        if stop is not None:
            stop_ids = torch.as_tensor([stop] if isinstance(stop, int) else list(stop), dtype=torch.long,
                                       device=tokens.device)
        want_diag = retrievals is not None and bool(state.memories)
        S, start, diag = self.cfg.segment_len, 0, None
        while start < T:  # the prompt, one segment (or the rest of the current one) at a time
            n = min(T - start, S - state.pending_len)
            diag = {} if want_diag else None
            logits, state = self.extend(tokens[:, start:start + n], state, diag)
            start += n
            if progress is not None:
                progress(n)
        next_logits = logits[:, -1]
        if stop_every is None:
            stop_every = 1 if self._reads_on_host(tokens.device) else 16
        out, checked = [], 0  # tokens generated; how many of them the last read of the stop condition covered
        done = checked_done = torch.zeros(B, dtype=torch.bool, device=tokens.device)  # row has produced a stop id
        nan_seen = torch.zeros((), dtype=torch.bool, device=tokens.device)  # argmax of NaN logits is a silent id
        for step in range(max_new_tokens):
            nan_seen = nan_seen | next_logits.isnan().any()
            tok = sample_next(next_logits, temperature, top_k, top_p, generator)
            out.append(tok)
            if want_diag:
                retrievals.append(_last_query_retrievals(diag))
            diag = {} if want_diag else None
            logits, state = self._extend(tok[:, None], state, diag, check=False)  # sampled ids lie in range
            next_logits = logits[:, -1]
            if stop_ids is not None:
                done = done | torch.isin(tok, stop_ids)
                if (step + 1) % stop_every == 0 or step + 1 == max_new_tokens:
                    if bool(done.all()):  # the one host read: every stop_every tokens
                        out = out[:checked + _tokens_until_all_stopped(out[checked:], checked_done, stop_ids)]
                        break
                    checked, checked_done = len(out), done
        self._check_finite(nan_seen)
        new = torch.stack(out, 1) if out else tokens.new_zeros(B, 0)
        return new, state

    def _check_finite(self, nan_seen: torch.Tensor) -> None:
        """Refuse tokens sampled from NaN logits: one host read after decoding on the host, an asynchronous
        device assert elsewhere (no synchronisation)."""
        msg = ("generate: the model's logits contain NaN (diverged or corrupted weights?); the sampled tokens "
               "would be arbitrary; check the checkpoint (its run's metrics.jsonl shows where the loss diverged)")
        if nan_seen.device.type == "meta":
            return
        if self._reads_on_host(nan_seen.device):
            if bool(nan_seen):
                raise ValueError(msg)
        else:
            torch._assert_async(~nan_seen, msg)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _tokens_until_all_stopped(recent: list, done_before: torch.Tensor, stop_ids: torch.Tensor) -> int:
    """Of the tokens `recent` ([B] each) generated after rows `done_before` [B] had stopped, how many up to and
    including the one after which every row has produced a stop id (some must have)."""
    stopped = torch.isin(torch.stack(recent, 1), stop_ids).cumsum(1).bool() | done_before[:, None]  # [B, m]
    return int((~stopped.all(0)).sum()) + 1


def _last_query_retrievals(diag: dict) -> dict:
    """Per memory layer, what the last query of a chunk retrieved (see MemorizingTransformer.generate)."""
    return {layer: {"positions": d["retrieved_positions"][:, :, -1], "weights": d["retrieved_weights"][:, :, -1],
                    "share": d["token_memory_share"][:, :, -1], "gate": d["gate"]}
            for layer, d in diag.items() if d}


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits [B, V]: argmax at temperature 0, otherwise a draw from the softmax of
    logits / temperature restricted to the top_k tokens and then to the top_p nucleus (at least one token)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        outside[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
    probs = logits.softmax(-1)
    # The draw torch.multinomial(probs, 1) makes, argmax(probs / q) with q ~ Exp(1) from the same generator
    # stream, without its host reads (multinomial checks the distribution with two .item() calls: two syncs
    # per token on a GPU). A generator on another device (the CLI's CPU one) draws q there; q then travels.
    q = torch.empty(probs.shape, dtype=probs.dtype, device=probs.device if generator is None else generator.device)
    q.exponential_(1, generator=generator)
    if q.device != probs.device:
        q = q.pin_memory().to(probs.device, non_blocking=True) if probs.device.type == "cuda" else q.to(probs.device)
    return (probs / q).argmax(-1)
