"""The jitted step of a live stream: one temporal patch prefilled behind ``[system ; carrier bank]``, then compacted.

The bank is a :class:`~qv_jax.cache.layered.LayeredKV` of fixed capacity ``prefix + entries · unit``: the system
prompt's keys / values, then one block of ``unit`` slots per bank entry (the kept visual tokens of a patch, then its
carrier). Every key of the bank precedes the chunk, so slot order is free: an evicted entry's block is simply
overwritten by the new patch. Eviction (VideoScan): when the bank is full, of the ``entries + 1`` carriers in stream
order (the held ones and the new one), the adjacent pair whose carrier embeddings have the largest cosine similarity
loses its earlier member. See docs/streaming.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qv_jax.attention import calls
from qv_jax.attention.backends import AttentionConfig
from qv_jax.cache.layered import LayeredKV

Array = jax.Array

# a carrier with zero norm has cosine 0 with everything (never NaN)
_COSINE_EPS = 1e-12


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bank:
    """The stream's memory: ``kv`` (system prompt + one slot block per entry), the carrier embedding ``emb [E, D]``
    (float32) and stream patch number ``patch [E]`` (-1 empty) of each entry, and ``count`` entries held."""

    kv: LayeredKV
    emb: Array
    patch: Array
    count: Array

    @property
    def entries(self) -> int:
        return self.patch.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What one step did: ``entry`` written, ``evicted`` patch number (-1: none), ``attended`` keys per query
    (bank keys held + chunk), the ``carrier`` embedding ``[D]``, and per layer the carrier's attention on the
    patch's visual tokens ``scores [L, n]`` (head mean of its probabilities) and the visual tokens kept ``kept
    [L, k]`` (empty when none or all are kept)."""

    entry: Array
    evicted: Array
    attended: Array
    carrier: Array
    scores: Array
    kept: Array


def evict_entry(emb_ED: Array, patch_E: Array, new_D: Array) -> Array:
    """The entry of a full bank to drop for ``new_D``: the earlier member of the most similar adjacent pair (the
    first such pair on ties) among the held carriers in stream order followed by the new one."""
    order = jnp.argsort(patch_E)
    seq = jnp.concatenate([emb_ED[order], new_D[None]], axis=0).astype(jnp.float32)
    unit = seq / jnp.maximum(jnp.linalg.norm(seq, axis=-1, keepdims=True), _COSINE_EPS)
    cosine = jnp.sum(unit[:-1] * unit[1:], axis=-1)  # [E]: pair (i, i + 1); its earlier member is always held
    return order[jnp.argmax(cosine)]


class PatchAttention:
    """:class:`~qv_jax.model.KVHandler` of one patch chunk ``[visual (n) ; carrier?]`` over the bank.

    Per layer the chunk attends to every held bank slot and causally to itself, then the keys / values it keeps —
    the carrier and the ``keep`` visual tokens its query attends to most (``keep=None``: all of them) — are written
    to slots ``[start, start + unit)``.
    """

    def __init__(
        self,
        kv: LayeredKV,
        start: Array,
        token_index: Array,
        *,
        visual: int,
        carrier: bool,
        keep: int | None,
        attention: AttentionConfig,
    ):
        self.kv = kv
        self.start = start
        self.token_index = token_index
        self.n = visual
        self.carrier = carrier
        self.keep = keep
        self.attention = attention
        self.scores: list[Array] = []
        self.kept: list[Array] = []

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        B, T = q_BNTH.shape[0], q_BNTH.shape[2]
        memory = jnp.where(self.kv.token_index[layer] >= 0, 0, -1).astype(jnp.int32)
        out, lse_BNT = calls.append_attention(
            self.attention, q_BNTH, k_BKTH, v_BKTH, jnp.zeros((B, T), jnp.int32),
            k_memory=self.kv.k[layer], v_memory=self.kv.v[layer], memory_segment_ids=memory,
        )  # fmt: skip
        n = self.n
        if self.keep is None:
            chosen = jnp.arange(T, dtype=jnp.int32)
        elif self.keep == 0:
            chosen = jnp.array([T - 1], jnp.int32)
        else:
            scores = _carrier_scores(q_BNTH[:, :, -1], lse_BNT[:, :, -1], k_BKTH[:, :, :n])  # [n]
            _, top = jax.lax.top_k(scores, self.keep)
            top = jnp.sort(top).astype(jnp.int32)
            chosen = jnp.concatenate([top, jnp.array([T - 1], jnp.int32)])
            self.scores.append(scores)
            self.kept.append(top)
        k_kept, v_kept = k_BKTH[:, :, chosen], v_BKTH[:, :, chosen]
        self.kv = self.kv.write_kv(layer, self.start, k_kept, v_kept)
        self.kv = self.kv.write_index(layer, self.start, jnp.broadcast_to(self.token_index[chosen], (B, chosen.size)))
        return out


def _carrier_scores(q_BNH: Array, lse_BN: Array, k_BKnH: Array) -> Array:
    """The carrier query's attention probabilities on the visual keys, averaged over heads: ``[n]``.

    ``lse`` normalises over everything the carrier saw (bank and chunk), so these are its true attention weights.
    """
    B, N, H = q_BNH.shape
    K = k_BKnH.shape[1]
    q_BKGH = q_BNH.reshape(B, K, N // K, H).astype(jnp.float32)
    logits_BKGn = jnp.einsum("BKGH,BKnH->BKGn", q_BKGH, k_BKnH.astype(jnp.float32)) * H**-0.5
    probs_BKGn = jnp.exp(logits_BKGn - lse_BN.reshape(B, K, N // K)[..., None])
    return probs_BKGn.mean(axis=(1, 2))[0]


@functools.partial(
    jax.jit, static_argnames=("graphdef", "carrier", "keep", "evict", "prefix"), donate_argnames=("bank",)
)
def stream_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    bank: Bank,
    embeds_nD: Array,
    positions_3T: Array,
    first_index: Array,
    patch: Array,
    *,
    carrier: bool,
    keep: int | None,
    evict: bool,
    prefix: int,
) -> tuple[Bank, StepInfo]:
    """One patch: its ``n`` visual embeddings (and, with ``carrier``, their mean appended as the carrier token) at
    ``positions_3T`` and prompt token indices ``first_index + [0, T)`` prefilled behind the bank; the kept tokens
    take the next free entry, or with ``evict`` on a full bank the evicted one's. ``prefix``: the system prompt's
    slots."""
    model = nnx.merge(graphdef, state)
    text = model.text
    x_nD = embeds_nD.astype(text.dtype)
    new_D = jnp.mean(embeds_nD.astype(jnp.float32), axis=0)
    x_TD = jnp.concatenate([x_nD, new_D[None].astype(text.dtype)]) if carrier else x_nD
    T = x_TD.shape[0]
    full = bank.count >= bank.entries
    free = jnp.argmax(bank.patch < 0).astype(jnp.int32)  # the first empty entry (a rebase may leave a hole)
    entry = jnp.where(full, evict_entry(bank.emb, bank.patch, new_D), free) if evict else free
    evicted = jnp.where(full, bank.patch[entry], -1) if evict else jnp.int32(-1)
    unit = T if keep is None else keep + 1
    held = jnp.sum(bank.kv.token_index[0, 0] >= 0)
    handler = PatchAttention(
        bank.kv,
        prefix + entry * unit,
        first_index + jnp.arange(T, dtype=jnp.int32),
        visual=embeds_nD.shape[0],
        carrier=carrier,
        keep=keep,
        attention=model.attention,
    )
    text(x_TD[None], positions_3T[:, None], handler)  # only the kept keys / values are needed
    count = jnp.minimum(bank.count + 1, bank.entries)
    # a layer's fill: the end of its last held entry (answers append behind it)
    patch_E = bank.patch.at[entry].set(patch)
    end = prefix + (jnp.max(jnp.where(patch_E >= 0, jnp.arange(bank.entries), -1)) + 1) * unit
    kv = dataclasses.replace(handler.kv, lengths=jnp.full_like(bank.kv.lengths, end))
    bank = Bank(
        kv=kv,
        emb=bank.emb.at[entry].set(new_D),
        patch=patch_E,
        count=count,
    )
    layers = text.cfg.num_layers
    scores = jnp.stack(handler.scores) if handler.scores else jnp.zeros((layers, 0), jnp.float32)
    kept = jnp.stack(handler.kept) if handler.kept else jnp.zeros((layers, 0), jnp.int32)
    info = StepInfo(entry=entry, evicted=evicted, attended=held + T, carrier=new_D, scores=scores, kept=kept)
    return bank, info


@functools.partial(jax.jit, static_argnames=("graphdef", "prefix", "unit"), donate_argnames=("bank",))
def rebase(
    graphdef: nnx.GraphDef, state: nnx.State, bank: Bank, shift: Array, drop: Array, *, prefix: int, unit: int
) -> Bank:
    """Move every bank key ``shift`` positions back on the temporal M-RoPE axis and empty the entries of patches
    before ``drop``; the system prompt's slots (``[0, prefix)``) stay.

    Keys are stored rotated; rotating the temporal frequency bands by ``-shift`` (the height / width bands by 0)
    gives exactly the keys at temporal position ``t - shift``, so a question sees the bank as if the stream had
    started ``shift`` positions later.
    """
    text = nnx.merge(graphdef, state).text
    S = bank.kv.capacity
    held = (bank.patch >= 0) & (bank.patch >= drop)
    slot_entry = (jnp.arange(S) - prefix) // unit  # -1 or less on the system prompt's slots
    slot_held = jnp.where(slot_entry >= 0, held[jnp.clip(slot_entry, 0, bank.entries - 1)], True)
    positions_3BS = jnp.zeros((3, 1, S), jnp.int32).at[0].set(jnp.where(slot_entry >= 0, -shift, 0))
    rope = text.rope(positions_3BS)
    kv = bank.kv
    k = tuple(rope.apply(a.astype(rope.cos_BTH.dtype)).astype(a.dtype) for a in kv.k)
    token_index = jnp.where(slot_held[None, None], kv.token_index, -1)
    end = prefix + (jnp.max(jnp.where(held, jnp.arange(bank.entries), -1)) + 1) * unit
    kv = dataclasses.replace(kv, k=k, token_index=token_index, lengths=jnp.full_like(kv.lengths, end))
    return Bank(kv=kv, emb=bank.emb, patch=jnp.where(held, bank.patch, -1), count=jnp.sum(held).astype(jnp.int32))
