"""The params schema: the shipped params.yaml parses, bad keys and values are named."""

from __future__ import annotations

import copy
import shlex

import pytest
import yaml

from lmops.config import (
    ConfigError,
    dvc_set_args,
    flatten,
    load_params,
    load_profile,
    parse_params,
)
from tests.conftest import REPO


@pytest.fixture
def raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_shipped_params_parse(raw):
    params = parse_params(raw)
    assert params.clean.languages == ["en", "fr"]
    assert [s.name for s in params.clean.sources] == ["wiki_en", "wiki_fr", "bible"]
    assert params.vocab.vocab_size == raw["vocab"]["vocab_size"]


def test_the_default_params_file_parses():
    params = load_params(REPO / "params.yaml")
    assert params.clean.source_lang == "en" and params.clean.target_lang == "fr"


def test_evaluate_decodes_with_its_own_defaults_where_the_file_is_silent(raw):
    shipped = parse_params(raw).evaluate.decode
    assert shipped.no_repeat_ngram_size == raw["evaluate"]["decode"]["no_repeat_ngram_size"] == 4
    del raw["evaluate"]["decode"]["no_repeat_ngram_size"]
    assert parse_params(raw).evaluate.decode == shipped  # a key left out: evaluate's default
    del raw["evaluate"]
    assert parse_params(raw).evaluate.decode == shipped
    raw["evaluate"] = {"decode": {"no_repeat_ngram_size": 0}}
    assert parse_params(raw).evaluate.decode.no_repeat_ngram_size == 0  # the file's word wins
    # the other decode sections keep the guards off unless asked
    assert parse_params(raw).distil.sequence_decode.no_repeat_ngram_size == 0


def test_unknown_key_is_named(raw):
    bad = copy.deepcopy(raw)
    bad["vocab"]["vocab_sise"] = 10
    with pytest.raises(ConfigError, match=r"vocab\.vocab_sise: unknown key"):
        parse_params(bad)


def test_unknown_section_is_named(raw):
    bad = copy.deepcopy(raw)
    bad["pretrian"] = {"lr": 1}
    with pytest.raises(ConfigError, match=r"pretrian: unknown key"):
        parse_params(bad)


def test_unknown_key_in_a_source_is_named(raw):
    bad = copy.deepcopy(raw)
    bad["clean"]["sources"][0]["colum"] = "x"
    with pytest.raises(ConfigError, match=r"clean\.sources\.0\.colum: unknown key"):
        parse_params(bad)


@pytest.mark.parametrize(
    ("section", "key", "value", "pattern"),
    [
        ("vocab", "vocab_size", "big", r"vocab\.vocab_size: .*integer"),
        ("vocab", "vocab_size", 3, r"vocab\.vocab_size: .*greater than or equal to 64"),
        ("vocab", "model_type", "wordpiece", r"vocab\.model_type: .*'unigram' or 'bpe'"),
        ("clean", "min_chars", 5000, r"min_chars must be below clean\.max_chars"),
        ("clean", "target_lang", "en", r"must differ"),
        ("model", "n_head", 3, r"divisible by model\.n_head"),
        ("pretrain", "min_lr", 1.0, r"min_lr must not exceed lr"),
        (
            "evaluate",
            "decode",
            {"min_new_tokens": 200},
            r"evaluate\.decode: min_new_tokens \(200\) must not exceed max_new_tokens \(96\)",
        ),
    ],
)
def test_bad_values_are_named(raw, section, key, value, pattern):
    bad = copy.deepcopy(raw)
    bad.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=pattern):
        parse_params(bad)


def test_source_needs_its_fields(raw):
    bad = copy.deepcopy(raw)
    bad["clean"]["sources"] = [{"name": "x", "type": "csv", "role": "monolingual", "lang": "en"}]
    with pytest.raises(ConfigError, match=r"type 'csv' needs 'path'"):
        parse_params(bad)


def test_groups_cannot_be_both_valid_and_test(raw):
    bad = copy.deepcopy(raw)
    bad["clean"]["split"]["test_groups"] = ["Ruth"]
    with pytest.raises(ConfigError, match=r"both valid and test: \['Ruth'\]"):
        parse_params(bad)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: parameters file not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "p.yaml"
    broken.write_text("clean: [unclosed\n")
    with pytest.raises(ConfigError, match="p.yaml: not valid YAML"):
        load_params(broken)


def test_flatten_prefixes_nested_keys(raw):
    flat = flatten(parse_params(raw).evaluate)
    assert flat["decode.beam_size"] == parse_params(raw).evaluate.decode.beam_size
    flat = flatten(parse_params(raw).clean)
    assert flat["sources.2.group_column"] == "book"


def test_dvc_stage_params_exist(raw):
    """Every param a DVC stage declares is a real key of params.yaml's schema."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = parse_params(raw).model_dump(by_alias=True)
    for name, stage in stages.items():
        for entry in stage.get("params", []):
            keys = entry if isinstance(entry, str) else next(iter(entry))
            node = params
            for part in keys.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: {keys} not in schema"
                node = node[part]


def test_dvc_stage_deps_exist():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for dep in stage.get("deps", []):
            if dep.startswith(("src/", "stages/")):
                assert (REPO / dep).is_file(), f"{name}: dep {dep} missing"


@pytest.mark.parametrize("profile", sorted(p.name for p in REPO.glob("params.*.yaml")))
def test_every_profile_validates_and_becomes_dvc_set_args(profile, capsys):
    from lmops.cli import main

    merged = parse_params(load_profile(REPO / profile, REPO / "params.yaml"))
    args = dvc_set_args(yaml.safe_load((REPO / profile).read_text()))
    assert args[0::2] == ["-S"] * (len(args) // 2)
    # each -S sets one leaf; applying them to params.yaml gives the merged result
    applied = yaml.safe_load((REPO / "params.yaml").read_text())
    for assignment in args[1::2]:
        key, value = assignment.split("=", 1)
        *path, leaf = key.split(".")
        node = applied
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    assert parse_params(applied) == merged
    main(["params", "check", str(REPO / "params.yaml")])
    assert capsys.readouterr().out == f"{REPO / 'params.yaml'}: ok\n"
    main(["params", "set-args", str(REPO / profile), "--base", str(REPO / "params.yaml")])
    assert shlex.split(capsys.readouterr().out) == args  # as `dvc exp run $(...)` reads it
