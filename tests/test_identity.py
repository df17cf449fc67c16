"""The one saved-vs-now comparison (data.identity) on hand-built cases."""
import pytest

from data.identity import ABSENT, check_same, describe_differences, differences, flatten


def test_flatten_nested_mappings_to_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": None}) == {"a.b": 1, "a.c.d": [2], "e": None}


def test_differences_lists_changed_added_and_removed_keys_sorted():
    saved = {"model": {"width": 64, "depth": 2}, "seed": 0}
    now = {"model": {"width": 128}, "seed": 0, "lr": 1e-3}
    assert differences(saved, now) == {"lr": (ABSENT, 1e-3), "model.depth": (2, ABSENT), "model.width": (64, 128)}
    assert differences(saved, saved) == {}


def test_a_key_the_saved_state_lacks_compares_as_its_default():
    saved = {"model": {"width": 64}}            # saved before model.prior existed
    defaults = {"model.width": 32, "model.prior": 0.0, "model.unused": 1}
    assert differences(saved, {"model": {"width": 64, "prior": 0.0}}, defaults=defaults) == {}
    assert differences(saved, {"model": {"width": 64, "prior": 3.0}}, defaults=defaults) == {"model.prior": (0.0, 3.0)}
    # a saved value wins over the default; a key without a default is still absent; nothing current lacks is added
    assert differences(saved, {"model": {"width": 32, "new": 1}}, defaults=defaults) == {
        "model.new": (ABSENT, 1), "model.width": (64, 32)}


def test_only_compares_the_named_keys():
    saved = {"seed": 0, "epoch": 3, "position": 7}
    assert differences(saved, {"seed": 0, "epoch": 9}, only=("seed",)) == {}
    assert differences(saved, {"seed": 1}, only=("seed",)) == {"seed": (0, 1)}


def test_check_same_names_every_difference_in_one_message():
    with pytest.raises(KeyError, match=r"cannot use the thing: it was made with other settings "
                                       r"\(a: old 1, new 2; b: old 'x', new 'y'\); do this"):
        check_same({"a": 1, "b": "x"}, {"a": 2, "b": "y"}, what="thing", hint="do this", error=KeyError,
                   saved_name="old", current_name="new")
    check_same({"a": 1}, {"a": 1}, what="thing", hint="")  # equal: no error


def test_describe_differences_caps_the_list():
    differing = {f"k{i:02d}": (i, i + 1) for i in range(12)}
    text = describe_differences(differing, limit=3)
    assert text == "k00: saved 0, now 1; k01: saved 1, now 2; k02: saved 2, now 3; and 9 more"
