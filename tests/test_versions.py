"""Specification of baton.versions: the order the downgrade check uses, and safe version names."""

from __future__ import annotations

import pytest

from baton.versions import InvalidVersion, compare_versions, parse_version, previous_good, validate_version

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("1.2.0", "1.10.0"),
        ("1.9", "1.10"),
        ("0.9.9", "1.0.0"),
        ("1.0.0-rc1", "1.0.0"),
        ("1.0.0-alpha", "1.0.0-beta"),
        ("1.0.0-rc2", "1.0.0-rc10"),
        ("1.0.0-1", "1.0.0-alpha"),
        ("1.0.0-alpha", "1.0.0-alpha.1"),
        ("1.0.0-beta.2", "1.0.0-beta.11"),
        ("2024.01.15", "2024.2.1"),
        ("1.2.3", "1.2.3.1"),
    ],
)
def test_older_version_compares_below_newer(older: str, newer: str) -> None:
    assert compare_versions(older, newer) == -1
    assert compare_versions(newer, older) == 1


def test_missing_release_components_count_as_zero() -> None:
    assert compare_versions("1.2", "1.2.0") == 0
    assert parse_version("1.2") == parse_version("1.2.0.0")


def test_leading_zeros_compare_numerically() -> None:
    assert compare_versions("1.02", "1.2") == 0


def test_build_metadata_is_ignored_for_order() -> None:
    assert compare_versions("1.2.0+build5", "1.2.0+build7") == 0
    assert compare_versions("1.2.0+build5", "1.2.1") == -1


def test_identical_versions_compare_equal() -> None:
    assert compare_versions("3.4.5-rc.1", "3.4.5-rc.1") == 0


def test_parsed_versions_order_with_operators() -> None:
    assert parse_version("1.0.0-rc1") < parse_version("1.0.0") <= parse_version("1.0") < parse_version("1.0.1")
    assert sorted(["1.10.0", "1.2.0", "1.2.0-rc1"], key=parse_version) == ["1.2.0-rc1", "1.2.0", "1.10.0"]


def test_parse_version_exposes_its_parts() -> None:
    v = parse_version("1.2.3-rc.1+abc")
    assert (v.release, v.pre, v.build, v.text) == ((1, 2, 3), ("rc", "1"), "abc", "1.2.3-rc.1+abc")


@pytest.mark.parametrize("bad", ["", "v1.2.0", "1.2.", ".1.2", "1.2.0-", "1.x", "latest", "1.2.0-rc_1", "1.0.0+"])
def test_unparsable_version_is_refused(bad: str) -> None:
    with pytest.raises(InvalidVersion):
        parse_version(bad)


def test_compare_versions_refuses_an_invalid_side() -> None:
    with pytest.raises(InvalidVersion, match="'next'"):
        compare_versions("1.0.0", "next")


@pytest.mark.parametrize("ok", ["1.2.0", "1.0.0-rc1", "2024-06-01_build3", "x" * 64])
def test_validate_version_accepts_plain_names(ok: str) -> None:
    assert validate_version(ok) == ok


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("", "empty"),
        ("1.2/3", "path separator"),
        ("..", r"'\.\.'"),
        ("1..2", r"'\.\.'"),
        (".hidden", "starts with '.'"),
        ("1.2 0", "whitespace"),
        ("1.2\t0", "whitespace"),
        ("1.2\n", "whitespace"),
        ("1.2\x00", "control"),
        ("x" * 65, "longer than 64"),
    ],
)
def test_validate_version_refuses_unsafe_directory_names(bad: str, why: str) -> None:
    with pytest.raises(InvalidVersion, match=why):
        validate_version(bad)


def test_parse_version_refuses_names_that_are_not_safe_directories() -> None:
    with pytest.raises(InvalidVersion, match="longer than 64"):
        parse_version("1." + "0." * 40 + "0")


def test_previous_good_is_the_highest_version_below_current() -> None:
    assert previous_good(["1.0.0", "1.2.0", "0.9.0", "1.1.0"], "1.2.0", []) == "1.1.0"


def test_previous_good_skips_versions_marked_failed() -> None:
    assert previous_good(["1.0.0", "1.1.0", "1.2.0"], "1.2.0", ["1.1.0"]) == "1.0.0"


def test_previous_good_never_moves_forward_after_a_rollback() -> None:
    assert previous_good(["1.1.0", "1.0.0"], "1.0.0", ["1.1.0"]) is None
    assert previous_good(["1.1.0", "1.0.0"], "1.0.0", []) is None


def test_previous_good_without_a_current_link_is_the_highest_good_version() -> None:
    assert previous_good(["1.0.0", "1.1.0", "2.0.0"], None, ["2.0.0"]) == "1.1.0"
