"""The typed TOML config: every mistake is refused with the file and key named, never defaulted."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from covid_cxr.config import (
    DataRecipe,
    ModelConfig,
    SourceSpec,
    SplitConfig,
    TrainConfig,
    dump_toml,
    from_dict,
    load_config,
    to_dict,
)
from covid_cxr.errors import ConfigError, CovidCxrError
from covid_cxr.imaging import PreprocessConfig


@dataclass(frozen=True)
class Leaf:
    level: int
    ratio: float = 0.5


@dataclass(frozen=True)
class Tree:
    """Small shapes the real configs use: nested table, list of tables, optionals, literals."""

    name: str
    leaves: list[Leaf]
    root: Leaf = field(default_factory=lambda: Leaf(level=0))
    mode: Literal["fast", "exact"] = "fast"
    note: str | None = None
    sizes: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


SOURCE = {"kind": "folder", "path": "chest_xray"}
TRICKY = 'C:\\data\\"quoted" \\n not a newline\nreal newline\ttab é 😀'


def refused(cls: type, data: dict[str, Any], *fragments: str) -> str:
    with pytest.raises(ConfigError) as caught:
        from_dict(cls, data)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_config_errors_are_covid_cxr_errors() -> None:
    assert issubclass(ConfigError, CovidCxrError)


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'name = "r"\n[[sources]]\nkind = "folder"\npath = "x"\n[split]\ntrian = 0.7\n',
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, DataRecipe)
    message = str(caught.value)
    assert str(path) in message
    assert "split" in message and "trian" in message
    assert "allowed" in message and "'train'" in message and "'seed'" in message


def test_unknown_top_level_key_is_refused_not_ignored() -> None:
    refused(Tree, {"name": "t", "leaves": [], "colour": "red"}, "colour", "'leaves'", "'mode'")


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"kind": 3, "path": "x"}, ("config.kind", "expected str", "3")),
        ({**SOURCE, "limit": True}, ("config.limit", "expected int", "True")),
        ({**SOURCE, "limit": 2.0}, ("config.limit", "expected int")),
        ({**SOURCE, "holdout": 1}, ("config.holdout", "expected bool")),
        ({**SOURCE, "labels": "COVID-19"}, ("config.labels", "expected a list")),
        ({**SOURCE, "labels": ["COVID-19", 7]}, ("config.labels[1]", "expected str")),
    ],
)
def test_wrong_types_are_refused_with_the_key(data: dict[str, Any], fragments: tuple) -> None:
    refused(SourceSpec, data, *fragments)


def test_float_is_not_accepted_as_int_nor_bool_as_float() -> None:
    refused(SplitConfig, {"seed": 4.2}, "config.seed", "expected int")
    refused(SplitConfig, {"train": True}, "config.train", "expected float")


def test_missing_required_keys_are_named() -> None:
    refused(DataRecipe, {"sources": [SOURCE]}, "missing required", "'name'")
    refused(
        DataRecipe,
        {"name": "r", "sources": [SOURCE, {"kind": "folder"}]},
        "config.sources[1]",
        "'path'",
    )


def test_int_is_accepted_where_float_is_expected() -> None:
    split = from_dict(SplitConfig, {"train": 1, "val": 0, "test": 0})
    assert split == SplitConfig(train=1.0, val=0.0, test=0.0)
    assert all(type(v) is float for v in (split.train, split.val, split.test))


def test_literal_values_are_checked_and_listed() -> None:
    recipe = {"name": "r", "sources": [SOURCE]}
    assert from_dict(DataRecipe, {**recipe, "balance": "per-split"}).balance == "per-split"
    refused(DataRecipe, {**recipe, "balance": "both"}, "config.balance", "'overall'", "'both'")
    refused(
        TrainConfig,
        {"name": "t", "manifest": "m.csv", "preprocess": {"intensity": "equalise"}},
        "config.preprocess.intensity",
        "'equalize'",
    )


def test_nested_tables_and_lists_of_tables_become_dataclasses() -> None:
    tree = from_dict(
        Tree,
        {
            "name": "t",
            "leaves": [{"level": 1}, {"level": 2, "ratio": 1}],
            "root": {"level": 5},
            "mode": "exact",
            "note": "n",
            "sizes": [1, 2],
            "extra": {"any": [1, "x"]},
        },
    )
    assert tree == Tree(
        name="t",
        leaves=[Leaf(1), Leaf(2, 1.0)],
        root=Leaf(5),
        mode="exact",
        note="n",
        sizes=[1, 2],
        extra={"any": [1, "x"]},
    )
    assert type(tree.leaves[1].ratio) is float
    refused(Tree, {"name": "t", "leaves": [{"level": 1}, {"level": "2"}]}, "config.leaves[1].level")
    refused(Tree, {"name": "t", "leaves": [], "root": 3}, "config.root", "expected a table")
    refused(Tree, {"name": "t", "leaves": [], "note": 3}, "config.note")


def test_recipe_tables_load_into_their_classes() -> None:
    recipe = from_dict(
        DataRecipe,
        {
            "name": "r",
            "sources": [SOURCE, {**SOURCE, "labels": ["COVID-19"], "limit": 196}],
            "split": {"train": 0.8, "val": 0.1, "test": 0.1, "seed": 7},
        },
    )
    assert [type(s) for s in recipe.sources] == [SourceSpec, SourceSpec]
    assert recipe.sources[1].labels == ["COVID-19"] and recipe.sources[1].limit == 196
    assert recipe.split == SplitConfig(0.8, 0.1, 0.1, 7)


def test_value_checks_of_the_dataclass_become_config_errors() -> None:
    refused(SplitConfig, {"train": 0.5, "val": 0.1, "test": 0.1}, "sum to 1")
    refused(SourceSpec, {**SOURCE, "limit": -1}, "limit")
    refused(TrainConfig, {"name": "t", "manifest": "m", "preprocess": {"size": 8}}, "size")


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_config(path, DataRecipe)


@pytest.mark.parametrize(
    "content",
    [b'name = "r"\nsources = [\n', b"name = unquoted\n", b'name = "\xff\xfe"\n'],
    ids=["unclosed-list", "bare-string", "not-utf8"],
)
def test_invalid_toml_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path, DataRecipe)
    assert str(path) in str(caught.value)
    assert "TOML" in str(caught.value)


def test_load_config_reads_a_real_recipe(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name = "pa-only"
balance = "overall"
[split]
train = 0.8
val = 0.1
test = 0.1
[[sources]]
kind = "cohen"
path = "covid-chestxray-dataset"
views = ["PA"]
[[sources]]
kind = "folder"
path = 'C:\\kaggle'
holdout = true
""",
    )
    recipe = load_config(path, DataRecipe)
    assert recipe.balance == "overall"
    assert [s.path for s in recipe.sources] == ["covid-chestxray-dataset", "C:\\kaggle"]
    assert recipe.sources[1].holdout and recipe.sources[0].views == ["PA"]


def round_trip(config: Any, tmp_path: Path) -> None:
    data = to_dict(config)
    text = dump_toml(data)
    assert tomllib.loads(text) == data
    path = write(tmp_path, text, "resolved.toml")
    assert load_config(path, type(config)) == config


def test_train_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = TrainConfig(
        name='run "7"',
        manifest="C:\\data\\manifest.csv",
        model=ModelConfig(
            name="efficientnet-lite0",
            options={"pretrained": True, "dropout": 0.2, "tags": [TRICKY, "b"], "inner": {"k": 1}},
        ),
        preprocess=PreprocessConfig(size=256, intensity="equalize", crop=0.9),
        seed=3,
        description=TRICKY,
    )
    round_trip(config, tmp_path)


def test_data_recipe_round_trips_through_toml(tmp_path: Path) -> None:
    config = DataRecipe(
        name="mixed",
        description=TRICKY + "\x7f\x00",
        sources=[
            SourceSpec(kind="folder", path='dir\\with "quotes"', labels=["COVID-19"], limit=5),
            SourceSpec(kind="nih", path="nih", name="NIH", holdout=True, views=["PA", "AP"]),
        ],
        split=SplitConfig(train=0.6, val=0.2, test=0.2, seed=1),
        balance="per-split",
        near_duplicate_distance=-1,
    )
    round_trip(config, tmp_path)
