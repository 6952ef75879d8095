"""Page selection and the sparse KV handlers against straightforward numpy implementations.

The rule (qv_jax.attention.page_selection): score every logical page by sum_d max(q_d kmax_d, q_d kmin_d) over the
visible keys' min / max, take the max over the group's query heads and over the logical pages of a page, keep the
best budget / P - 1 pages older than the newest (ties: lower index) plus the newest page, read everything while the
context fits the budget, and reuse a selection for reselect_every steps unless the newest page changes.
Small integer queries and keys make every score exact, so ties are real ties.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qv_jax.attention import SparsityConfig
from qv_jax.attention.backends import AttentionConfig
from qv_jax.attention.page_selection import needs_selection, top_pages, visit_list
from qv_jax.cache.sparse import SparseKVCache
from qv_jax.runtime.sparse import SparseDecodeAttention, SparsePrefillAttention

P, LP, BUDGET, EVERY = 8, 4, 24, 3  # pages of 8 slots (2 logical pages of 4), budget 3 pages, reuse 3 steps
SINK, LOCAL = 3, 5


class NumpySelector:
    """The selection rule written out for one (row, KV head), with its own reuse state."""

    def __init__(self, budget=BUDGET, page=P, every=EVERY):
        self.budget, self.page, self.every = budget, page, every
        self.selected, self.at = [], -1

    def step(self, length, score_fn):
        """Pages read at a step of ``length`` slots and whether it selected; ``score_fn()`` gives page scores."""
        newest = (length - 1) // self.page
        if length <= self.budget:
            return list(range(newest + 1)), False
        stale = self.at < 0 or length - self.at >= self.every or (self.at - 1) // self.page != newest
        if stale:
            scores = score_fn()
            by_score = sorted(range(newest), key=lambda page: (-scores[page], page))
            self.selected = sorted(by_score[: self.budget // self.page - 1])
            self.at = length
        return [*self.selected, newest], stale


def test_rule_functions_match_numpy_over_many_steps():
    rng = np.random.default_rng(0)
    num_pages, keep = 16, BUDGET // P - 1
    ref = NumpySelector()
    top = jnp.zeros((1, 1, keep), jnp.int32)
    selected_at = jnp.int32(-1)
    for length in range(1, num_pages * P + 1):
        scores = rng.integers(0, 3, num_pages).astype(np.float32)  # many ties
        want, want_stale = ref.step(length, lambda s=scores: list(s))
        stale = needs_selection(jnp.int32(length), selected_at, token_budget=BUDGET, page_size=P, reselect_every=EVERY)
        assert bool(stale) == want_stale, length
        if stale:
            top = top_pages(jnp.asarray(scores)[None, None], (length - 1) // P, keep)
            selected_at = jnp.int32(length)
        idx, count = visit_list(top, jnp.int32(length), token_budget=BUDGET, page_size=P)
        assert list(np.asarray(idx[0, 0, : int(count[0, 0])])) == want, length


# ---- the handlers on one layer: 2 retrieval KV heads then 1 streaming head, 2 query heads each -------------------

B, K, R, G, H = 2, 3, 2, 2, 16
LAYOUT = SparsityConfig(
    streaming_heads=[[False, False, True]],
    sink=SINK,
    local=LOCAL,
    page_size=P,
    logical_page_size=LP,
    token_budget=BUDGET,
    reselect_every=EVERY,
    backend="xla",
)


def numpy_attend(q_GH, keys_SH, values_SH):
    logits = q_GH @ keys_SH.T / np.sqrt(H)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p @ values_SH / p.sum(axis=1, keepdims=True)


class History:
    """Every written slot's keys / values / segment id, and the numpy view of what each head may see."""

    def __init__(self, capacity):
        self.k = np.zeros((B, K, capacity, H))
        self.v = np.zeros((B, K, capacity, H))
        self.seg = np.full((B, capacity), -1)

    def write(self, start, k, v, seg):
        T = seg.shape[1]
        self.k[:, :, start : start + T] = k
        self.v[:, :, start : start + T] = v
        self.seg[:, start : start + T] = seg

    def streaming_slots(self, b, p):
        slots = np.flatnonzero(self.seg[b, : p + 1] >= 0)
        n = len(slots)
        return [s for r, s in enumerate(slots) if r < SINK or (n - 1) - r < LOCAL]

    def page_scores(self, b, h, q_GH, length):
        """Physical-page scores of one retrieval head, by the rule as written."""
        num_pages = -(-length // P)
        scores = []
        for page in range(num_pages):
            best = -np.inf
            for lp in range(page * P, (page + 1) * P, LP):
                vis = [s for s in range(lp, lp + LP) if self.seg[b, s] >= 0]
                if not vis:
                    continue
                kmin, kmax = self.k[b, h, vis].min(axis=0), self.k[b, h, vis].max(axis=0)
                best = max(best, np.maximum(q_GH * kmax, q_GH * kmin).sum(axis=1).max())
            scores.append(best)
        return scores


def random_qkv(rng, T):
    q = rng.integers(-2, 3, (B, K * G, T, H)).astype(np.float32)
    k = rng.integers(-2, 3, (B, K, T, H)).astype(np.float32)
    v = rng.standard_normal((B, K, T, H)).astype(np.float32)
    return q, k, v


@jax.jit
def prefill_layer(cache, q, k, v, seg):
    handler = SparsePrefillAttention(cache, seg, AttentionConfig("reference"))
    return handler(0, q, k, v), handler.cache


@jax.jit
def decode_layer(cache, q, k, v):
    handler = SparseDecodeAttention(cache, jnp.zeros((B, 1), jnp.int32), AttentionConfig("reference"))
    return handler(0, q, k, v), handler.cache


def test_handlers_match_numpy_attention_and_page_selection():
    rng = np.random.default_rng(1)
    cache = SparseKVCache.create(LAYOUT, num_kv_heads=K, batch=B, capacity=80, head_dim=H)
    hist = History(cache.capacity)
    # two prefill chunks: row 1 left-padded by 5, row 0 right-padded by 3 at the end of the prompt
    seg = np.zeros((B, 32), np.int32)
    seg[1, :5] = -1
    seg[0, 29:] = -1
    start = 0
    for chunk in (seg[:, :16], seg[:, 16:]):
        q, k, v = random_qkv(rng, 16)
        out, cache = prefill_layer(cache, q, k, v, jnp.asarray(chunk))
        hist.write(start, k, v, chunk)
        for b in range(B):
            for t in np.flatnonzero(chunk[b] >= 0):
                p = start + t
                for h in range(K):
                    seen = hist.streaming_slots(b, p) if h >= R else np.flatnonzero(hist.seg[b, : p + 1] >= 0)
                    want = numpy_attend(q[b, h * G : (h + 1) * G, t], hist.k[b, h, seen], hist.v[b, h, seen])
                    np.testing.assert_allclose(np.asarray(out[b, h * G : (h + 1) * G, t]), want, atol=1e-5)
        start += 16

    selector = [[NumpySelector() for _ in range(R)] for _ in range(B)]
    reselections = 0
    for _ in range(40):  # 32 -> 72 slots: crosses the budget (24) and five page boundaries
        q, k, v = random_qkv(rng, 1)
        out, cache = decode_layer(cache, q, k, v)
        p = start
        hist.write(p, k, v, np.zeros((B, 1), np.int32))
        length = p + 1
        for b in range(B):
            for h in range(K):
                q_GH = q[b, h * G : (h + 1) * G, 0]
                if h >= R:
                    seen = hist.streaming_slots(b, p)
                else:
                    scores = hist.page_scores(b, h, q_GH, length)
                    pages, stale = selector[b][h].step(length, lambda scores=scores: scores)
                    reselections += stale
                    seen = [s for page in pages for s in range(page * P, (page + 1) * P) if hist.seg[b, s] >= 0]
                    if length > BUDGET:
                        assert list(np.asarray(cache.selected[0][b, h])) == pages[:-1]
                want = numpy_attend(q_GH, hist.k[b, h, seen], hist.v[b, h, seen])
                np.testing.assert_allclose(np.asarray(out[b, h * G : (h + 1) * G, 0]), want, atol=1e-5)
        start += 1
    assert int(cache.selected_at) == selector[0][0].at
    assert reselections > 2 * 10  # every 3 steps plus page boundaries, per row and head


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_decode_handler_on_the_interpreted_kernels_matches_xla(kernel):
    rng = np.random.default_rng(2)
    configs = {"xla": LAYOUT, "interpret": dataclasses.replace(LAYOUT, backend="interpret", kernel=kernel)}
    q, k, v = random_qkv(rng, 32)
    step = random_qkv(rng, 1)
    outs, caches = {}, {}
    for name, cfg in configs.items():
        cache = SparseKVCache.create(cfg, num_kv_heads=K, batch=B, capacity=80, head_dim=H)
        _, cache = prefill_layer(cache, q, k, v, jnp.zeros((B, 32), jnp.int32))
        outs[name], caches[name] = decode_layer(cache, *step)  # 33 slots > budget: scores and selects
    np.testing.assert_allclose(np.asarray(outs["interpret"]), np.asarray(outs["xla"]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(caches["interpret"].selected[0]), np.asarray(caches["xla"].selected[0]))
