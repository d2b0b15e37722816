"""Family manifests: a valid one loads; every broken one names the manifest and the field."""

import re

import pytest

from mergelab.errors import ManifestError
from mergelab.io.family import load_family


def test_valid_manifest_loads(tiny_family):
    family = load_family(tiny_family)
    assert family.name == "tiny" and family.domains == ("alpha", "beta", "gamma")
    assert family.size_names == ("s",) and family.size("s").expert_names == ("alpha", "beta", "gamma")
    assert family.token_budget == 40 and all(p.is_file() for p in family.eval_sets.values())
    assert load_family(tiny_family.parent) == family  # a directory means its family.toml


def edit(manifest, old, new):
    text = manifest.read_text()
    assert re.search(old, text, flags=re.M), old
    manifest.write_text(re.sub(old, new, text, count=1, flags=re.M))
    return manifest


@pytest.mark.parametrize("old, new, fragment", [
    (r'^name = "tiny"\n', "", "missing field 'name'"),
    (r'^name = "tiny"', "name = 3", "field 'name' must be str, got int"),
    (r"^domains = .*", "domains = []", "non-empty list"),
    (r"^domains = .*", 'domains = ["alpha", "alpha", "beta", "gamma"]', "lists a domain twice"),
    (r"^token_budget = 40", "token_budget = 0", "'token_budget' must be a positive integer"),
    (r'^alpha = "eval/alpha.jsonl"', 'alpha = "eval/missing.jsonl"', "eval.alpha points at"),
    (r'^alpha = "eval/alpha.jsonl"\n', "", "missing field eval.'alpha'"),
    (r"^\[eval\]", '[eval]\ndelta = "eval/alpha.jsonl"', "eval.delta is not one of the family's domains"),
    (r"^n_params = \d+", 'n_params = "big"', "field sizes.s.'n_params' must be int"),
    (r'^base = "s/base"', 'base = "s/nothing"', "sizes.s.base points at"),
    (r'^beta = "s/experts/beta"', 'beta = "s/experts/alpha"', "lists the same checkpoint twice"),
    (r"^\[sizes.s.experts\](\n.*)*", "[sizes.s.experts]\n", "sizes.s.experts is empty"),
    (r"^name = ", "name = = ", "not valid TOML"),
])
def test_broken_manifests_name_the_problem(tiny_family, old, new, fragment):
    edit(tiny_family, old, new)
    with pytest.raises(ManifestError) as err:
        load_family(tiny_family)
    assert str(tiny_family) in str(err.value) and fragment in str(err.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="family manifest not found"):
        load_family(tmp_path / "family.toml")


def test_unknown_size(tiny_family):
    with pytest.raises(ManifestError, match=r"no size 'xl' \(sizes: s\)"):
        load_family(tiny_family).size("xl")
