import pytest

from conveyor.memory import (
    ConservativeReservation,
    DynamicReservation,
    IndexAllocator,
    IntegrityError,
    KVCacheManager,
    OutOfIndices,
)


def test_allocator_hands_out_lowest_first_and_detects_double_free():
    a = IndexAllocator(4, first=1)
    assert a.allocate(2) == [1, 2]
    assert a.num_free == 2
    a.free([1])
    assert a.allocate(1) == [1]
    with pytest.raises(ValueError, match="double free"):
        a.free([3])
    with pytest.raises(OutOfIndices):
        a.allocate(3)
    a.check()


def test_conservative_reserves_prompt_plus_max_tokens_up_front():
    kv = KVCacheManager(num_pages=10, page_size=4, reservation=ConservativeReservation())
    assert kv.can_admit(num_tokens=10, max_new_tokens=30)  # 40 tokens = 10 pages
    assert not kv.can_admit(num_tokens=10, max_new_tokens=31)
    kv.admit("a", 10, 30)
    assert len(kv.page_tables["a"]) == 10 and kv.num_free_pages == 0
    assert kv.grow("a", 40)  # already covered: never needs the pool again
    kv.free("a")
    assert kv.num_free_pages == 10
    kv.check_integrity()


def test_dynamic_admits_on_beta_share_and_grows_on_demand():
    kv = KVCacheManager(num_pages=10, page_size=4, reservation=DynamicReservation(beta=0.5))
    assert kv.can_admit(8, 64)  # 8 + 32 = 40 tokens = 10 pages
    assert not kv.can_admit(8, 66)
    kv.admit("a", 8, 64)
    assert kv.page_tables["a"] == []
    assert kv.grow("a", 9) and len(kv.page_tables["a"]) == 3
    assert not kv.grow("a", 45)  # 12 pages > 10: refused, nothing allocated
    assert len(kv.page_tables["a"]) == 3
    kv.check_integrity()


def test_integrity_check_catches_a_leak():
    kv = KVCacheManager(num_pages=4, page_size=4, reservation=DynamicReservation())
    kv.admit("a", 4, 4)
    kv.grow("a", 8)
    kv.page_tables.pop("a")  # lose the table without freeing: a leak
    with pytest.raises(IntegrityError):
        kv.check_integrity()
