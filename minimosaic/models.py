"""Language models on the engine: the Memory Mosaic and a GPT baseline with the same interface.

MemoryMosaic (no positional embedding: the memories see order through leaky keys and peek-ahead values)

    x = E[ids]                                          token embedding only, std 0.02 (as the official code)
    x = x + ContextMemory(LN(x));  x = x + PersistentMemory(LN(x))         per block (pre-LN residual)
    logits = LN_f(x) @ E^T                              tied output head (as the official code)

    At init each logit is LN_f(x) . E_v ~ N(0, 0.02^2 d): near 0, so the first loss is about ln V.

GPT (nanoGPT-style pre-LN transformer, as the paper's baseline)

    x = E[ids] + P[positions]
    x = x + W_o attention(LN(x));  x = x + W_out gelu(LN(x) W_in)          causal, 1/sqrt(hs), MLP 4d,
                                                        exact (erf) GELU as torch.nn.GELU
    logits = LN_f(x) @ E^T                              tied head, standard (unscaled) logits
    position_embedding=False (NoPE): x = E[ids], no P; order comes only from the causal mask, so like
    the mosaic it reads (and generates past) any length, also beyond block_size.
    init: N(0, 0.02^2) everywhere, N(0, (0.02 / sqrt(2 n_layer))^2) for W_o and W_out (GPT-2).

Parameter budget: a GPT block holds 12 d^2 weights (attention 4 d^2, MLP 8 d^2). A mosaic block holds
W_k, W_v, W_o (context, 3 d^2) + W_k, W_o (persistent, 2 d^2) + P_k, P_v (2 * pmem_size * d); the
default pmem_size = int(3.5 d) (`default_pmem_size`) makes that 7 d^2, so 12 d^2 too, and both models of the same d and
depth have nearly the same size (the GPT also has block_size * d position weights).

state_dict names (d = n_embd, H = n_head, hs = d / H, V = vocab_size, i = block index; memories.py
documents the memories' own parameters and their 10x-faster storage):
  MemoryMosaic  token_embedding.weight (V, d)           embedding and output head (tied)
                blocks.i.ln_1.weight (d,)               LayerNorm before the context memory (.bias with bias)
                blocks.i.context.key.{W_k.weight (d, d), leak_rate (H,), log_scale (H,)}
                blocks.i.context.value.{W_v.weight (d, d), peek (H,), log_scale (H,)}
                blocks.i.context.W_o.weight (d, d)
                blocks.i.ln_2.weight (d,)               LayerNorm before the persistent memory
                blocks.i.persistent.key.{W_k.weight (d, d), leak_rate (H,), log_scale (H,)}
                blocks.i.persistent.P_k, .P_v (pmem_count, H, pmem_size, hs), .log_scale (H,)
                blocks.i.persistent.W_o.weight (d, d)
                ln_f.weight (d,)                        final LayerNorm
  GPT           token_embedding.weight (V, d), position_embedding.weight (block_size, d)
                blocks.i.ln_1.weight (d,), blocks.i.attention.{W_q, W_k, W_v, W_o}.weight (d, d)
                blocks.i.ln_2.weight (d,), blocks.i.mlp.W_in.weight (d, 4d), blocks.i.mlp.W_out.weight (4d, d)
                ln_f.weight (d,)
Linear weights are (in, out): y = x @ W. With bias=True every Linear and LayerNorm also has `.bias`.
Memory Mosaics v2 options (ModelConfig adaptive_bandwidth, gated_keys, memory_levels; all off by default)
add: with memory_levels 3, blocks.i.long_term.* and blocks.i.short_term.* (each a context memory) in place
of blocks.i.context.*; with gated_keys, <memory>.key.W_gate.weight and .W_decay.weight (d, H); with
adaptive_bandwidth, <memory>.bandwidth.{log_beta0, log_beta1, alpha_logit} (H,) and no <memory>.key.log_scale
(the context memories only; the persistent memory stays the 2024 one).

Dropout p (as the official code, in training only): on the embedding, on each residual branch, and on
the attention weights of both memories and of the GPT's attention.

Generation (`generate`) keeps a cache per block (`cache["blocks"][i]`, which the block gets as its
`cache`). Mosaic: the leaky key sums (O(d) per new token), the
stored keys, the completed values (v_{t-1} is finished when x_t arrives) and the last W_v x; each new
token then costs O(t d) instead of a full pass over the sequence. The mosaic has no positions, so it
never crops: the context memory keeps the whole text, also past block_size (beyond the lengths it was
trained on), and neither does the GPT without position embeddings. The GPT crops to the last block_size tokens; once the text is longer, the cached positions
shift every token, so it recomputes the cropped window each step (as without the cache).
"""
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import backend, nn, ops
from .errors import MinimosaicError
from .memories import (ContextMemory, PersistentMemory, attention_weights, causal_mask, merge_heads, project,
                       softmax_attention, split_heads)
from .tensor import no_grad

MODELS = ("mosaic", "gpt")
PMEM_PER_EMBD = 3.5   # persistent slots per head per unit of n_embd: 7 d^2 slot weights, 12 d^2 per block


def default_pmem_size(n_embd):
    """int(3.5 n_embd): the persistent memory size that gives a mosaic block a GPT block's 12 d^2 weights."""
    return int(PMEM_PER_EMBD * n_embd)


@dataclass
class ModelConfig:
    """Everything that fixes a model's shape. pmem_size None is filled in as default_pmem_size(n_embd)."""
    model: str = "mosaic"
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    pmem_size: int | None = None
    pmem_count: int = 1
    dropout: float = 0.0
    bias: bool = False
    # Memory Mosaics v2 (arXiv 2507.03285), each off by default: the default model is the 2024 one
    adaptive_bandwidth: bool = False   # section 3.1: beta = beta1 n^alpha + beta0 in the context memories
    gated_keys: bool = False           # section 3.2: input-dependent gate and decay in the leaky keys
    memory_levels: int | None = None   # 3 (section 3.3): short-term + long-term + persistent memory
    short_window: int = 64             # with 3 levels: the short-term memory holds the last 64 pairs
    long_skip: int = 64                # with 3 levels: the long-term memory skips the last 64 pairs
    position_embedding: bool = True   # GPT only: False = no position embedding (NoPE); the mosaic has none

    def __post_init__(self):
        if self.pmem_size is None and isinstance(self.n_embd, int):
            self.pmem_size = default_pmem_size(self.n_embd)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MinimosaicError(f"unknown model setting(s) {', '.join(unknown)}: "
                                  f"use only {', '.join(sorted(known))}")
        config = cls(**d)
        config.validate()
        return config

    def validate(self):
        """Raise MinimosaicError (one line: what is wrong, what to do) unless this config can work."""
        if self.model not in MODELS:
            raise MinimosaicError(f"unknown model {self.model!r}: use one of {', '.join(MODELS)}")
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "pmem_size", "pmem_count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise MinimosaicError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise MinimosaicError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}: "
                                  f"pick n_head that divides n_embd")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise MinimosaicError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("bias", "position_embedding", "adaptive_bandwidth", "gated_keys"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise MinimosaicError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._validate_v2()
        return self

    def _validate_v2(self):
        if self.memory_levels is not None and (isinstance(self.memory_levels, bool) or self.memory_levels != 3):
            raise MinimosaicError(f"memory_levels must be 3 (short-term, long-term and persistent memory), got "
                                  f"{self.memory_levels!r}; leave it out for the 2024 model's context and "
                                  f"persistent memory")
        for name, low in (("short_window", 1), ("long_skip", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise MinimosaicError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.memory_levels == 3 and self.short_window < self.long_skip:
            raise MinimosaicError(f"short_window {self.short_window} is below long_skip {self.long_skip}: the "
                                  f"pairs between them would be in neither memory; use short_window >= long_skip")
        if self.model == "gpt" and (self.adaptive_bandwidth or self.gated_keys or self.memory_levels):
            raise MinimosaicError("adaptive_bandwidth, gated_keys and memory_levels are Memory Mosaic options: "
                                  "drop them for the GPT")


def build_model(config):
    """The MemoryMosaic or GPT that `config` describes, initialised from nn.init_rng (seed it with
    nn.manual_seed first for a reproducible model)."""
    config.validate()
    return MemoryMosaic(config) if config.model == "mosaic" else GPT(config)


# ---------------------------------------------------------------- shared by both models
class LanguageModel(nn.Module):
    """model(ids) -> logits; loss; generate (with a cache); the subclass defines forward and blocks."""
    max_context = None  # tokens a forward pass can take (None: any number)

    def loss(self, ids, targets):
        """Mean cross entropy of next-token predictions; targets == -1 are not counted."""
        targets = self.token_embedding.weight.xp.asarray(targets)
        return ops.cross_entropy(self(ids), targets, ignore_index=-1)

    def new_cache(self):
        """An empty generation cache: tokens seen so far and one cache dict per block."""
        return {"length": 0, "blocks": [{} for _ in self.blocks]}

    def _ids(self, ids, cache):
        """ids as a 2-D integer array on the parameters' device; checks the length limit."""
        on_host = backend.device_of(ids) == "cpu"
        ids = np.asarray(ids) if on_host else ids
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise MinimosaicError(f"ids must be a 2-D integer array (batch, time), got {ids.dtype} "
                                  f"{tuple(ids.shape)}")
        # Checked where the ids are made, on the host: on a GPU the check would stop the host until the
        # device caught up, every step. Ids already on the device are the caller's to check.
        if on_host and ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise MinimosaicError(f"token ids must lie in [0, {self.config.vocab_size}): is the tokenizer "
                                  f"the one this model was trained with?")
        ids = self.token_embedding.weight.xp.asarray(ids)
        past = 0 if cache is None else cache["length"]
        if self.max_context is not None and past + ids.shape[1] > self.max_context:
            raise MinimosaicError(f"{past + ids.shape[1]} tokens exceed block_size {self.max_context} of "
                                  f"this GPT: crop the input to its last {self.max_context} tokens")
        if cache is not None:
            cache["length"] = past + ids.shape[1]
        return ids, past

    def _logits(self, x):
        """LN_f(x) @ E^T: (B, T, C) -> (B, T, V), as one (B*T, C) GEMM."""
        B, T, C = x.shape
        h = self.ln_f(x).reshape(B * T, C)
        return (h @ self.token_embedding.weight.T).reshape(B, T, -1)

    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, seed=None, use_cache=True):
        """Sample max_new_tokens after a 1-D prompt; returns prompt + new ids (NumPy int64).

        temperature 0 picks the most likely token (greedy); top_k keeps only the k most likely.
        use_cache=False recomputes the whole (for the GPT: cropped) text for every new token.
        """
        prompt = np.asarray(prompt_ids)
        if prompt.ndim != 1 or prompt.size == 0 or prompt.dtype.kind not in "iu":
            raise MinimosaicError("the prompt must be a non-empty 1-D sequence of token ids")
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise MinimosaicError("need max_new_tokens >= 0, temperature >= 0 and top_k >= 1 (or none)")
        rng = np.random.default_rng(seed)
        ids = [int(i) for i in prompt]
        window = self.max_context or len(ids) + max_new_tokens
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                cache = None
                for _ in range(max_new_tokens):
                    if cache is not None and cache["length"] < window:  # only the newest token
                        logits = self(np.asarray([ids[-1:]]), cache)
                    else:  # the whole (cropped) text, filling a fresh cache if there is one
                        cache = self.new_cache() if use_cache else None
                        logits = self(np.asarray([ids[-window:]]), cache)
                    ids.append(_sample(backend.asnumpy(logits.data[0, -1]), temperature, top_k, rng))
        finally:
            self.train(was_training)
        return np.asarray(ids, dtype=np.int64)


def _sample(logits, temperature, top_k, rng):
    """One token id from a row of logits (host array)."""
    z = logits.astype(np.float64)
    if temperature == 0:
        return int(z.argmax())
    if top_k is not None and top_k < len(z):
        z[z < np.sort(z)[-top_k]] = -np.inf
    p = np.exp((z - z.max()) / temperature)
    return int(rng.choice(len(z), p=p / p.sum()))


# ---------------------------------------------------------------- Memory Mosaic
class MosaicBlock(nn.Module):
    """x = x + ContextMemory(LN(x));  x = x + PersistentMemory(LN(x)).

    With memory_levels 3 (v2, arXiv 2507.03285, section 3.3) the context memory is split in two, which
    read the same LN(x) and add their answers: x = x + LongTerm(LN(x)) + ShortTerm(LN(x)), the long-term
    memory skipping the last long_skip pairs and the short-term one holding only the last short_window.
    """

    def __init__(self, config):
        d, H, bias = config.n_embd, config.n_head, config.bias
        v2 = dict(gated_keys=config.gated_keys, adaptive_bandwidth=config.adaptive_bandwidth)
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        if config.memory_levels == 3:
            self.long_term = ContextMemory(d, H, config.n_layer, bias, config.dropout, skip=config.long_skip, **v2)
            self.short_term = ContextMemory(d, H, config.n_layer, bias, config.dropout,
                                            window=config.short_window, **v2)
        else:
            self.context = ContextMemory(d, H, config.n_layer, bias, config.dropout, **v2)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.persistent = PersistentMemory(d, H, config.pmem_size, config.pmem_count, config.n_layer, bias,
                                           config.dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.levels = ("long_term", "short_term") if config.memory_levels == 3 else ("context",)

    def forward(self, x, cache=None):
        h = self.ln_1(x)                                  # every context level reads the same LN(x)
        for name in self.levels:
            x = x + self.dropout(getattr(self, name)(h, _sub(cache, name)))
        return x + self.dropout(self.persistent(self.ln_2(x), _sub(cache, "persistent")))


def _sub(cache, name):
    return None if cache is None else cache.setdefault(name, {})


class MemoryMosaic(LanguageModel):
    """The Memory Mosaic language model (see the module docstring)."""

    def __init__(self, config):
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd, std=0.02)
        self.blocks = [MosaicBlock(config) for _ in range(config.n_layer)]
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids, cache=None):
        """ids (B, T) integer array -> logits (B, T, V). With a cache, continue the text it holds."""
        ids, _ = self._ids(ids, cache)
        x = self.dropout(self.token_embedding(ids))                              # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache["blocks"][i])
        return self._logits(x)

    def inspect(self, ids):
        """Per block a dict of NumPy arrays:
        context (B, H, T, T): weights over past positions (with memory_levels 3: long_term and short_term,
            each (B, H, T, T), in place of context);
        persistent (B, H, T, pmem_size): weights over stored slots, averaged over banks;
        levels: {memory name: (B, T) |its output|}, the size of what each memory added to the residual
            stream at each position (the one with the largest answered most);
        bandwidth (adaptive bandwidth only): {memory name: (H, T) beta(n_t)};
        gates (gated keys only): {memory name: ((B, H, T) g_t, (B, H, T) lambda_t)}."""
        ids, _ = self._ids(ids, None)
        found = []
        with no_grad():
            x = self.token_embedding(ids)
            T = ids.shape[1]
            for block in self.blocks:
                h = block.ln_1(x)
                layer, levels = {}, {}
                for name in block.levels:
                    memory = getattr(block, name)
                    layer[name] = backend.asnumpy(memory.kernel_weights(h))
                    y = memory(h)
                    levels[name] = _norm(y)
                    x = x + y
                    if memory.bandwidth is not None:
                        layer.setdefault("bandwidth", {})[name] = backend.asnumpy(memory.bandwidths(T))
                    if memory.key.gated:
                        layer.setdefault("gates", {})[name] = tuple(backend.asnumpy(g.data)
                                                                    for g in memory.key.gates(h))
                h = block.ln_2(x)
                layer["persistent"] = backend.asnumpy(block.persistent.kernel_weights(h))
                y = block.persistent(h)
                levels["persistent"] = _norm(y)
                layer["levels"] = levels
                x = x + y
                found.append(layer)
        return found


def _norm(y):
    """|y_t| over channels: (B, T) NumPy."""
    return backend.asnumpy(y.xp.sqrt((y.data * y.data).sum(axis=-1)))


# ---------------------------------------------------------------- GPT baseline
class CausalSelfAttention(nn.Module):
    """y = W_o [softmax(q k^T / sqrt(hs), causal) v]_heads,  q, k, v = x W_q, x W_k, x W_v."""

    def __init__(self, n_embd, n_head, n_layer, bias=False, dropout=0.0):
        self.n_head, self.dropout = n_head, dropout
        self.W_q, self.W_k, self.W_v = (nn.Linear(n_embd, n_embd, bias=bias, std=0.02) for _ in range(3))
        self.W_o = nn.Linear(n_embd, n_embd, bias=bias, std=0.02 / math.sqrt(2 * n_layer))

    def _qkv(self, x, cache=None):
        q, k, v = (split_heads(project(W, x), self.n_head) for W in (self.W_q, self.W_k, self.W_v))
        past = 0
        if cache is not None:
            if "keys" in cache:
                past = cache["keys"].shape[2]
                k = ops.concatenate([cache["keys"], k], axis=2)
                v = ops.concatenate([cache["values"], v], axis=2)
            cache["keys"], cache["values"] = k.data, v.data
        return q, k, v, past

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v, past = self._qkv(x, cache)
        mask = causal_mask(q.xp, T, past, include_present=True)
        y = softmax_attention(q, k, v, mask=mask, scale=(C // self.n_head) ** -0.5,
                              dropout=self.dropout if self.training else 0.0)
        return self.W_o(merge_heads(y)).reshape(B, T, C)

    def kernel_weights(self, x):
        """Attention weights (B, H, T, T), raw array."""
        q, k, _, _ = self._qkv(x)
        T = q.shape[2]
        return attention_weights(q.data, k.data, causal_mask(q.xp, T, 0, True), q.shape[3] ** -0.5)


class MLP(nn.Module):
    """y = gelu(x W_in) W_out,  W_in (d, 4d), W_out (4d, d)."""

    def __init__(self, n_embd, n_layer, bias=False):
        self.W_in = nn.Linear(n_embd, 4 * n_embd, bias=bias, std=0.02)
        self.W_out = nn.Linear(4 * n_embd, n_embd, bias=bias, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, x):
        return project(self.W_out, ops.gelu(project(self.W_in, x)))


class GPTBlock(nn.Module):
    """x = x + attention(LN(x));  x = x + MLP(LN(x))."""

    def __init__(self, config):
        d, bias = config.n_embd, config.bias
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        self.attention = CausalSelfAttention(d, config.n_head, config.n_layer, bias, config.dropout)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.mlp = MLP(d, config.n_layer, bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        x = x + self.dropout(self.attention(self.ln_1(x), cache))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT(LanguageModel):
    """The GPT baseline (see the module docstring)."""

    def __init__(self, config):
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd, std=0.02)
        if config.position_embedding:  # learned positions 0..block_size-1: no longer input can be read
            self.max_context = config.block_size
            self.position_embedding = nn.Embedding(config.block_size, config.n_embd, std=0.02)
        self.blocks = [GPTBlock(config) for _ in range(config.n_layer)]
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids, cache=None):
        """ids (B, T) integer array, T <= block_size (with the cache: in all) -> logits (B, T, V)."""
        ids, past = self._ids(ids, cache)
        x = self.dropout(self._embed(ids, past))
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache["blocks"][i])
        return self._logits(x)

    def _embed(self, ids, past):
        if not self.config.position_embedding:  # NoPE: order only through the causal mask
            return self.token_embedding(ids)                                     # (B, T, C)
        positions = self.token_embedding.weight.xp.arange(past, past + ids.shape[1])
        return self.token_embedding(ids) + self.position_embedding(positions)    # (B, T, C)

    def inspect(self, ids):
        """Per block: dict(context=(B, H, T, T) attention weights), NumPy arrays."""
        ids, _ = self._ids(ids, None)
        found = []
        with no_grad():
            x = self._embed(ids, 0)
            for block in self.blocks:  # the block's forward without dropout
                h = block.ln_1(x)
                found.append({"context": backend.asnumpy(block.attention.kernel_weights(h))})
                x = x + block.attention(h)
                x = x + block.mlp(block.ln_2(x))
        return found
