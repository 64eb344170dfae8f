"""The one name rule and the outward names built from it (winclip_edge/names.py), with property tests."""
from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from winclip_edge.names import (MAX_NAME, NAME_RULE, InvalidName, check_name, check_new_name, check_topic,
                                is_valid_name, safe_stem, suggest_name, topic)

BAD = ["a+b", "a#b", "metal nut", "x;rm", "ünï", "../evil", ".hidden", "", "a/b", "a\\b", "$SYS", "name.",
       "-lead", "_lead", "a" * (MAX_NAME + 1), "tab\tname", "nul\x00", "a%2Fb", "a?b", "a*b"]
GOOD = ["widget", "metal_nut", "Bottle-2", "v1.2", "a", "A" * MAX_NAME, "0", "x_-.y"]
SAFE = set(string.ascii_letters + string.digits + "_-.")


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_with_the_one_message(name):
    assert not is_valid_name(name)
    with pytest.raises(InvalidName, match=re.escape(NAME_RULE)):
        check_name(name)


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass_unchanged(name):
    assert check_name(name) == name


def test_the_message_names_what_and_the_value():
    with pytest.raises(InvalidName, match=r"station name 'a\+b' is not valid"):
        check_name("a+b", "station")


def test_a_name_differing_only_in_case_from_an_existing_one_is_refused():
    with pytest.raises(InvalidName, match="only in case"):
        check_new_name("Widget", ["widget", "bottle"])
    assert check_new_name("widget", ["widget"]) == "widget"  # the same name (re-encoding) is not a clash


@given(st.text(max_size=80))
def test_a_valid_name_is_safe_everywhere_it_travels(text):
    if not is_valid_name(text):
        with pytest.raises(InvalidName):
            check_name(text)
        return
    assert 1 <= len(text) <= MAX_NAME and set(text) <= SAFE
    assert text[0].isalnum() and not text.endswith(".") and ".." != text
    check_topic(f"winclip/{text}/result")  # an MQTT level
    assert text == text.strip() and "/" not in text  # a path segment / file name


@given(st.text(max_size=200))
def test_suggest_name_always_gives_a_valid_name(text):
    assert is_valid_name(suggest_name(text))


@pytest.mark.parametrize("bad, why", [("a/+/b", "wildcard"), ("a/#", "wildcard"), ("$SYS/x", "'\\$'"),
                                      ("a\x00b", "NUL"), ("", "not a topic"), ("a" * 70000, "bytes long")])
def test_publish_topics_are_checked(bad, why):
    with pytest.raises(InvalidName, match=why):
        check_topic(bad)


def test_topic_levels_are_checked():
    assert topic("winclip", "line1", "widget", "result") == "winclip/line1/widget/result"
    with pytest.raises(InvalidName):
        topic("winclip", "a/b")
    with pytest.raises(InvalidName):
        topic("winclip", "")


@given(st.lists(st.text(max_size=300), min_size=1, max_size=20))
@settings(max_examples=200)
def test_output_stems_are_safe_and_unique_without_case(names):
    used: set[str] = set()
    stems = [safe_stem(n, used) for n in names]
    for s in stems:
        assert s and set(s) <= SAFE and not s.startswith(".") and len(s) <= 110
    assert len({s.casefold() for s in stems}) == len(stems)


def test_plain_stems_are_kept_and_repeats_numbered():
    used: set[str] = set()
    assert [safe_stem(n, used) for n in ["a/part.png", "b/part.png", "c/Part.png", "x.tar.png"]] == \
        ["part", "part-2", "Part-3", "x.tar"]


def test_changed_stems_keep_the_originals_apart():
    assert safe_stem("../../etc/passwd").startswith("passwd")
    a, b = safe_stem("métal nut.png"), safe_stem("metal nut.png")
    assert a != b and a.startswith("metal_nut-") and b.startswith("metal_nut-")
    assert len(safe_stem("x" * 5000 + ".png")) <= 100
