import functools

from hypothesis import given, settings, strategies as st

from agent.omaha import versions

V3 = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4)


def dotted(parts, zeros=0):
    return ".".join(("0" * zeros) + str(p) for p in parts)


def padded(parts):
    return tuple(parts) + (0,) * (4 - len(parts))


@given(V3, V3)
def test_dotted_integers_order_as_the_v3_text_says(a, b):
    expected = (padded(a) > padded(b)) - (padded(a) < padded(b))
    assert versions.compare(dotted(a), dotted(b)) == expected


@given(V3, st.integers(0, 3))
def test_leading_zeros_and_trailing_zero_elements_do_not_matter(a, zeros):
    assert versions.same(dotted(a, zeros), dotted(padded(a)))


def test_spec_examples():
    assert versions.same("1.2", "1.2.0.0")
    assert versions.same("1.001", "1.1")
    assert versions.is_newer("1.005", "1.4")
    assert versions.is_newer("1.0.66.44", "1.0.66.43")
    assert not versions.is_newer("1.2", "1.2.0")


def test_real_world_versions():
    assert versions.is_newer("14092.106.2021_11_08_1354", "14092.106.2021_11_08_1016")
    assert versions.is_newer("14093.0.2020_01_01_0000", "14092.106.2021_11_08_1354")
    assert versions.is_newer("1.2.3", "1.2.3-rc1")
    assert versions.is_newer("1.2.3-rc2", "1.2.3-rc1")
    assert versions.is_newer("1.2.3-rc10", "1.2.3-rc9")
    assert versions.same("1.0+build5", "1.0+build6")
    assert versions.same("v2.0", "2.0")
    assert versions.is_newer("3510.2.0", "3374.2.5")  # Flatcar


def test_prefix_match_is_component_wise():
    assert versions.matches_prefix("1.2.3.4", "1.2.3")
    assert not versions.matches_prefix("1.2.34", "1.2.3")
    assert versions.matches_prefix("1.2.3", "1.2.3$") and not versions.matches_prefix("1.2.3.1", "1.2.3$")
    assert versions.matches_prefix("anything", "")


any_version = st.text(max_size=24) | st.from_regex(r"v?[0-9]{1,4}(\.[0-9a-z_]{1,5}){0,4}(-[a-z0-9.]{1,6})?(\+[a-z0-9]{1,4})?",
                                                    fullmatch=True)


@settings(max_examples=500)
@given(st.lists(any_version, min_size=3, max_size=8))
def test_ordering_is_total_and_transitive_and_never_raises(items):
    ordered = sorted(items, key=versions.key)
    for a, b in zip(ordered, ordered[1:]):
        assert versions.compare(a, b) <= 0
        assert versions.compare(b, a) >= 0
    for a in items:
        assert versions.compare(a, a) == 0
        for b in items:
            assert versions.compare(a, b) == -versions.compare(b, a)
            assert versions.is_newer(a, b) == (versions.compare(a, b) > 0)
            for c in items:
                if versions.compare(a, b) <= 0 and versions.compare(b, c) <= 0:
                    assert versions.compare(a, c) <= 0
    by_cmp = sorted(items, key=functools.cmp_to_key(versions.compare))
    assert [versions.key(v) for v in by_cmp] == [versions.key(v) for v in ordered]
