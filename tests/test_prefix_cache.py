"""The radix prefix cache on its own and under the KV manager: no model, no torch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.memory import ConservativeReservation, DynamicReservation, KVCacheManager, RadixCache

PS = 2  # tokens per page: small, so random token strings share and diverge often


def pages_of(n: int, start: int) -> list[int]:
    return list(range(start, start + n))


def test_match_insert_split_and_duplicates():
    c = RadixCache(PS)
    node, taken = c.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    assert taken == [10, 11, 12] and c.num_pages == 3
    # A longer string sharing two pages: only its new page is taken; its copies of 1,2/3,4 are not.
    node2, taken2 = c.insert([1, 2, 3, 4, 9, 9, 7], [20, 21, 22])
    assert taken2 == [22] and c.num_pages == 4
    assert c.match([1, 2, 3, 4, 5, 6, 0]).pages == [10, 11, 12]
    assert c.match([1, 2, 3, 4, 9, 9]).pages == [10, 11, 22]
    assert c.match([1, 2, 3, 4, 9, 9], max_pages=1).pages == [10]
    assert c.match([1, 3]).pages == []
    assert c.match([1]).pages == []  # less than a page never matches
    c.check()


def test_locked_paths_survive_eviction_and_lru_order():
    c = RadixCache(PS)
    c.insert([1, 1, 2, 2], [1, 2])
    c.insert([1, 1, 3, 3], [3, 4])  # splits: [1,1] -> {[2,2], [3,3]}
    c.insert([5, 5], [5])
    m = c.match([1, 1, 2, 2, 0])
    c.lock(m.node)
    assert c.num_evictable_pages == 2  # [3,3] and [5,5]; [1,1] and [2,2] are locked
    c.match([5, 5, 0])  # touch [5,5]: [3,3] is now the least recently used
    assert c.evict(1) == [4]
    assert c.evict(10) == [5]  # the locked path stays
    assert c.match([1, 1, 2, 2]).pages == [1, 2]
    c.unlock(m.node)
    assert sorted(c.evict(10)) == [1, 2] and c.num_pages == 0
    with pytest.raises(AssertionError):
        c.unlock(m.node)
    c.check()


ops = st.lists(
    st.tuples(st.sampled_from(["insert", "match_lock", "unlock", "evict"]),
              st.lists(st.integers(0, 2), min_size=0, max_size=10), st.integers(0, 6)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_radix_cache_agrees_with_a_naive_prefix_map(script):
    """The reference keeps {whole-page prefix: page}. Matches, ownership and eviction must agree."""
    cache = RadixCache(PS)
    ref: dict[tuple[int, ...], int] = {}
    locks: list[tuple[object, list[tuple[int, ...]]]] = []
    next_page = 1
    for op, tokens, n in script:
        whole = len(tokens) // PS
        prefixes = [tuple(tokens[: (k + 1) * PS]) for k in range(whole)]
        if op == "insert":
            pages = pages_of(whole, next_page)
            next_page += whole
            _, taken = cache.insert(tokens, pages)
            expect = [p for key, p in zip(prefixes, pages) if key not in ref]
            for key, p in zip(prefixes, pages):
                ref.setdefault(key, p)
            assert taken == expect
        elif op == "match_lock":
            m = cache.match(tokens)
            k = 0
            while k < whole and prefixes[k] in ref:
                k += 1
            assert m.pages == [ref[key] for key in prefixes[:k]]
            cache.lock(m.node)
            locks.append((m.node, prefixes[:k]))
        elif op == "unlock" and locks:
            node, _ = locks.pop(n % len(locks))
            cache.unlock(node)
        elif op == "evict":
            freed = set(cache.evict(n))
            assert len(freed) >= min(n, 1) or cache.num_evictable_pages == 0
            protected = {key for _, keys in locks for key in keys}
            for key in [k for k, p in ref.items() if p in freed]:
                assert key not in protected, "evicted a page a lock protects"
                del ref[key]
            for key in ref:  # eviction takes leaves: every cached prefix keeps its ancestors
                assert all(key[: j * PS] in ref for j in range(1, len(key) // PS))
        cache.check()
        assert cache.num_pages == len(ref)
        assert sorted(cache.all_pages()) == sorted(ref.values())


def test_manager_shares_cached_pages_and_evicts_only_what_nobody_reads():
    kv = KVCacheManager(num_pages=8, page_size=PS, reservation=DynamicReservation(beta=0.0, adapt=False),
                        enable_prefix_caching=True)
    doc = [7, 7, 8, 8, 9, 9]
    kv.admit("a", 7, 0)
    assert kv.grow("a", 7)
    kv.cache("a", doc + [1])  # three whole pages go to the cache, the partial fourth stays private
    assert kv.num_cached_pages == 3
    m = kv.match_prefix(doc + [2, 2])
    assert m is not None and m.pages == kv.page_tables["a"][:3]
    kv.admit("b", 8, 0, m)
    assert kv.grow("b", 8) and kv.page_tables["b"][:3] == kv.page_tables["a"][:3]
    kv.check_integrity()
    kv.free("a")
    kv.free("b", doc + [2, 2])  # b's own fourth page is cached too
    assert kv.num_cached_pages == 4 and kv.num_available_pages == 8 and kv.num_free_pages == 4
    kv.check_integrity()
    # The last token always stays to compute: a prompt equal to a cached string matches one page less.
    assert kv.match_prefix(doc).num_pages == 2
    kv.admit("c", 16, 0)
    assert kv.grow("c", 16) and kv.num_evicted_pages == 4 and kv.num_cached_pages == 0  # all 8 pages
    kv.free("c")
    kv.check_integrity()


def test_admission_counts_promises_of_running_requests():
    kv = KVCacheManager(num_pages=10, page_size=4, reservation=DynamicReservation(beta=0.5, adapt=False))
    assert kv.can_admit(8, 16)  # 8 + 8 tokens = 4 pages
    kv.admit("a", 8, 16)
    assert kv.num_outstanding_pages == 4
    assert kv.can_admit(8, 32) and not kv.can_admit(8, 40)  # 6 pages fit beside a's 4, 7 do not
    assert kv.grow("a", 12) and kv.num_outstanding_pages == 1
    kv.free("a")
    assert kv.num_outstanding_pages == 0


def test_dynamic_beta_decays_towards_observed_usage_and_jumps_on_retraction():
    r = DynamicReservation(beta=0.5, decay=0.1)
    r.on_step()
    assert r.beta == 0.5  # nothing observed yet: no adaptation
    for _ in range(4):
        r.on_finish(20, 100)  # outputs use a fifth of max_tokens
    r.on_step()
    assert r.beta == pytest.approx(0.4)
    for _ in range(5):
        r.on_step()
    assert r.beta == pytest.approx(0.2)  # floor at the observed ratio
    r.on_retract()
    assert r.beta == pytest.approx(0.3)
    r.on_finish(100, 100)
    r.on_finish(100, 100)  # outputs got longer: mean ratio 0.47 > beta, raised at once
    r.on_step()
    assert r.beta == pytest.approx((4 * 0.2 + 2 * 1.0) / 6)
    assert ConservativeReservation().admission_tokens(3, 5) == 8
