"""How connected parameters are stored, and how overridden values come back typed."""

from __future__ import annotations

import argparse
import pathlib

import pytest

from controller.sdk.params import cast_like, merge_connected, read_values, to_stored, write_values


@pytest.mark.parametrize(
    ("stored", "default", "expected"),
    [
        ("7", 10, 7),
        (7.0, 10, 7),
        ("0.5", 0.1, 0.5),
        (2, 0.1, 2.0),
        ("true", False, True),
        ("False", True, False),
        ("yes", False, True),
        ("0", True, False),
        (1, False, True),
        (42, "name", "42"),
        ("[3, 4]", [1], [3, 4]),
        ("(3, 4)", (1,), (3, 4)),
        ('{"b": 2}', {"a": 1}, {"b": 2}),
        ("{'b': 2}", {"a": 1}, {"b": 2}),
        ("None", None, None),
        ("anything", None, "anything"),
        (None, 5, None),
    ],
)
def test_an_overridden_value_takes_the_type_of_its_default(stored: object, default: object, expected: object) -> None:
    value = cast_like(stored, default)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("stored", "default"),
    [("abc", 1), ("0.5", 1), ("maybe", True), ("x", 0.1), ("[1, 2", [1]), ("[1]", {"a": 1})],
)
def test_a_value_that_cannot_take_the_default_type_is_refused_naming_the_parameter(
    stored: object, default: object
) -> None:
    with pytest.raises(ValueError, match=r"General/p: cannot use .* as "):
        cast_like(stored, default, "parameter General/p")


def test_under_an_agent_stored_values_win_and_new_keys_keep_their_defaults() -> None:
    merged = merge_connected(
        {"lr": 0.1, "epochs": 3, "new": "x"}, {"lr": "0.5", "epochs": "9", "gone": 1}, "General",
        prefer_stored=True,
    )
    assert merged == {"lr": 0.5, "epochs": 9, "new": "x"}
    assert merge_connected({"lr": 0.1}, {"lr": "0.5"}, "General", prefer_stored=False) == {"lr": 0.1}


def test_objects_namespaces_and_classes_connect_by_attribute() -> None:
    class Config:
        lr = 0.1
        layers = 2

        def method(self) -> None: ...

    ns = argparse.Namespace(lr=0.1, name="n")
    assert read_values(ns) == {"lr": 0.1, "name": "n"}
    assert read_values(Config) == {"lr": 0.1, "layers": 2}
    write_values(Config, {"lr": 0.5})
    write_values(ns, {"name": "m"})
    assert Config.lr == 0.5 and ns.name == "m"


def test_values_are_stored_as_json_values() -> None:
    assert to_stored((1, 2)) == [1, 2]
    assert to_stored(pathlib.PurePosixPath("/a/b")) == "/a/b"
    assert to_stored({"k": (1, {"n": None})}) == {"k": [1, {"n": None}]}
