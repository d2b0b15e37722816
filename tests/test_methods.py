"""Each merge formula against hand-computed tiny tensors, including DESIGN §4's edge cases."""

import json
import math
import re

import pytest
import torch

from mergelab.errors import HyperparameterError
from mergelab.engine.methods import METHODS, MergeContext, canonical_hparams, get_method
from mergelab.engine.methods.dare import keep_mask
from mergelab.engine.methods.ties import trim

CTX = MergeContext("layer.weight", ("e1", "e2"))


def run(name, base, deltas, ctx=CTX, **hp):
    method = get_method(name)
    return method.merge(torch.tensor(base), torch.tensor(deltas), ctx, method.resolve(hp))


def test_average_is_mean_of_experts():
    out = run("average", [1.0, 2.0], [[1.0, 0.0], [3.0, 2.0]])
    assert torch.equal(out, torch.tensor([3.0, 3.0]))


@pytest.mark.parametrize("normalize, expected", [(True, [1 + 1.6, 2 + 0.8]), (False, [1 + 3.2, 2 + 1.6])])
def test_task_arithmetic_scales_sum(normalize, expected):
    out = run("task_arithmetic", [1.0, 2.0], [[1.0, 0.0], [3.0, 2.0]], normalize=normalize)
    assert torch.allclose(out, torch.tensor(expected))


def test_task_arithmetic_c_one_normalized_equals_average():
    base, deltas = [0.5, -1.0, 2.0], [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25], [0.0, 1.0, -2.0]]
    assert torch.allclose(run("task_arithmetic", base, deltas, c=1.0), run("average", base, deltas))


TIES_DELTAS = [[3.0, -1.0, 0.5, -2.0], [-1.0, 2.0, 0.5, -4.0]]


def test_ties_trim_elect_disjoint_mean():
    # density 0.5 keeps 2 of 4 per expert: e1 -> [3,0,0,-2], e2 -> [0,2,0,-4];
    # sum [3,2,0,-6] elects [+,+,+,-]; disjoint mean [3, 2, 0, (-2-4)/2].
    out = run("ties", [0.0] * 4, TIES_DELTAS, density=0.5)
    assert torch.equal(out, torch.tensor([3.0, 2.0, 0.0, -3.0]))


def test_ties_lambda_scales_merged_vector():
    out = run("ties", [1.0] * 4, TIES_DELTAS, density=0.5, **{"lambda": 0.5})
    assert torch.equal(out, torch.tensor([2.5, 2.0, 1.0, -0.5]))


def test_ties_density_times_n_below_one_keeps_one_entry():
    # density·n = 0.4 < 1: peers keep nothing; we keep the single largest |v| per expert.
    out = run("ties", [0.0] * 4, TIES_DELTAS, density=0.1)
    assert torch.equal(out, torch.tensor([3.0, 0.0, 0.0, -4.0]))


def test_ties_zero_elected_sign_counts_as_positive():
    out = run("ties", [0.0], [[1.0], [-1.0]], density=1.0)
    assert torch.equal(out, torch.tensor([1.0]))


def test_ties_all_zero_entries_stay_at_base():
    out = run("ties", [5.0, 5.0], [[0.0, 0.0], [0.0, 0.0]], density=1.0)
    assert torch.equal(out, torch.tensor([5.0, 5.0]))


def test_ties_trim_is_per_expert_and_per_tensor():
    deltas = torch.tensor([[[1.0, -5.0], [2.0, 0.1]], [[0.2, 0.3], [0.4, -0.1]]])
    kept = trim(deltas, 0.25)
    assert torch.equal(kept[0], torch.tensor([[0.0, -5.0], [0.0, 0.0]]))
    assert torch.equal(kept[1], torch.tensor([[0.0, 0.0], [0.4, 0.0]]))


def test_dare_with_p_zero_is_average():
    base, deltas = [1.0, 2.0, 3.0], [[1.0, 0.0, -1.0], [3.0, 2.0, 1.0]]
    assert torch.equal(run("dare", base, deltas, p=0.0), run("average", base, deltas))


def test_dare_matches_hand_formula_with_its_masks():
    torch.manual_seed(0)
    base, deltas = torch.randn(6, 5), torch.randn(2, 6, 5)
    method = get_method("dare")
    hp = method.resolve({"p": 0.3, "seed": 7})
    out = method.merge(base, deltas, CTX, hp)
    masks = [keep_mask((6, 5), 0.3, 7, e, CTX.tensor) for e in CTX.experts]
    expected = base + sum(m * d / 0.7 for m, d in zip(masks, deltas)) / 2
    assert torch.allclose(out, expected, atol=1e-6)
    assert 0 < sum(int(m.sum()) for m in masks) < 60  # some dropped, some kept


def test_dare_masks_do_not_depend_on_subset_order():
    torch.manual_seed(1)
    base, d1, d2 = torch.randn(8), torch.randn(8), torch.randn(8)
    method = get_method("dare")
    hp = method.resolve({"p": 0.5})
    ab = method.merge(base, torch.stack([d1, d2]), MergeContext("t", ("a", "b")), hp)
    ba = method.merge(base, torch.stack([d2, d1]), MergeContext("t", ("b", "a")), hp)
    assert torch.allclose(ab, ba, atol=1e-7)


def test_dare_masks_differ_by_expert_tensor_and_seed():
    m = keep_mask((1000,), 0.5, 0, "a", "t")
    assert torch.equal(m, keep_mask((1000,), 0.5, 0, "a", "t"))
    for other in (keep_mask((1000,), 0.5, 0, "b", "t"), keep_mask((1000,), 0.5, 0, "a", "u"),
                  keep_mask((1000,), 0.5, 1, "a", "t")):
        assert not torch.equal(m, other)
    assert abs(m.float().mean().item() - 0.5) < 0.06


def test_dare_without_rescale_shrinks_survivors():
    base, deltas = torch.zeros(4), torch.ones(1, 4)
    method = get_method("dare")
    out = method.merge(base, deltas, MergeContext("t", ("a",)), method.resolve({"p": 0.5, "rescale": False}))
    assert set(out.tolist()) <= {0.0, 1.0}


def test_bf16_inputs_accumulate_in_fp32():
    # bf16-stored weights are upcast before merging: the sum of many small deltas must not be rounded to bf16.
    base = torch.tensor([1.0], dtype=torch.bfloat16).float()
    deltas = torch.full((9, 1), 2.0 ** -10, dtype=torch.bfloat16).float()
    out = get_method("task_arithmetic").merge(base, deltas, CTX, {"c": 1.0, "normalize": False})
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(1.0 + 9 * 2.0 ** -10, abs=0)


@pytest.mark.parametrize("method, hp, fragment", [
    ("ties", {"density": 0.0}, "ties.density=0.0 is out of range (0.0, 1.0]"),
    ("ties", {"density": 1.5}, "out of range"),
    ("ties", {"density": float("nan")}, "must be finite"),
    ("ties", {"density": "high"}, "must be a number"),
    ("ties", {"lambda": -1}, "out of range"),
    ("dare", {"p": 1.0}, "dare.p=1.0 is out of range [0.0, 1.0)"),
    ("dare", {"p": -0.1}, "out of range"),
    ("dare", {"seed": 1.5}, "must be an integer"),
    ("dare", {"rescale": "yes"}, "must be true or false"),
    ("task_arithmetic", {"c": 0}, "out of range"),
    ("average", {"c": 1}, "average has no hyperparameter 'c'"),
])
def test_bad_hyperparameters_are_refused(method, hp, fragment):
    with pytest.raises(HyperparameterError) as err:
        get_method(method).resolve(hp)
    assert fragment in str(err.value)


def test_unknown_method_lists_known_ones():
    with pytest.raises(HyperparameterError, match="unknown merge method 'slerp' .*average, task_arithmetic, ties, dare"):
        get_method("slerp")


def test_defaults_are_pinned_and_canonical():
    assert METHODS["task_arithmetic"].defaults == {"c": 0.8, "normalize": True}
    assert METHODS["ties"].defaults == {"density": 0.2, "lambda": 1.0}
    assert METHODS["dare"].defaults == {"p": 0.2, "rescale": True, "seed": 0}
    assert canonical_hparams(METHODS["ties"].resolve({"lambda": 1, "density": 0.2})) == '{"density":0.2,"lambda":1.0}'
    assert math.isclose(METHODS["dare"].resolve({"p": 0})["p"], 0.0)


@pytest.mark.parametrize("name", list(METHODS))
def test_split_form_equals_the_direct_formula(name):
    """prepare once per expert, then combine (or θ0 + scale·Σ) per subset == merge."""
    torch.manual_seed(3)
    base, deltas = torch.randn(7, 5), torch.randn(4, 7, 5)
    ctx = MergeContext("w", ("a", "b", "c", "d"))
    method = get_method(name)
    hp = method.resolve({})
    prepared = method.prepare(deltas, ctx, hp) if method.prepare else deltas
    if method.linear_scale:
        split = base + method.linear_scale(4, hp) * prepared.sum(dim=0)
    else:
        split = method.combine(base, prepared, ctx, hp)
    assert torch.allclose(split, method.merge(base, deltas, ctx, hp), atol=1e-6)
    # preparing all experts, then picking a subset, equals preparing the subset
    sub = MergeContext("w", ("b", "d"))
    picked = prepared[[1, 3]]
    direct = method.prepare(deltas[[1, 3]], sub, hp) if method.prepare else deltas[[1, 3]]
    assert torch.allclose(picked, direct)


def test_mask_form_equals_prepare_for_every_masking_method():
    """A method that states its prepare as a keep mask (what the engine may store as bits) must mean
    exactly its prepare: v ⊙ keep · keep_scale, bit for bit."""
    import torch

    from mergelab.engine.methods import METHODS, MergeContext

    deltas = torch.randn(3, 40, 7, generator=torch.Generator().manual_seed(0))
    ctx = MergeContext("model.layers.0.mlp.up_proj.weight", ("a", "b", "c"))
    masking = [m for m in METHODS.values() if m.keep is not None]
    assert {"ties", "dare"} <= {m.name for m in masking}
    for method in masking:
        hp = method.resolve({})
        mask = method.keep(deltas, ctx, hp)
        assert mask.dtype == torch.bool and mask.shape == deltas.shape
        assert 0 < mask.sum() < mask.numel(), method.name
        scale = method.keep_scale(hp) if method.keep_scale else 1.0
        assert torch.equal(method.prepare(deltas, ctx, hp), deltas * mask * scale), method.name


# ---- issue 17: primitives, the new methods, per-expert weights and tensor filters -------------------

from mergelab.engine.methods import primitives  # noqa: E402
from mergelab.engine.methods.options import (  # noqa: E402
    check_options, expert_weights, is_merged, kept_from_base, per_expert_scale)

NEW_METHODS = ("dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "tsv_m")
CTX4 = MergeContext("model.layers.0.mlp.up_proj.weight", ("a", "b", "c", "d"))


def test_breadcrumbs_band_drops_the_largest_and_the_smallest():
    # |v| = 1..10: gamma 0.2 drops the 2 largest (10, 9), density 0.5 keeps the next 5 (8..4), drops 3, 2, 1.
    v = torch.tensor([[3.0, -10.0, 1.0, 8.0, -4.0, 9.0, 2.0, -7.0, 6.0, 5.0]])
    mask = primitives.magnitude_band(v, 0.5, 0.2)
    assert v[mask].abs().sort().values.tolist() == [4.0, 5.0, 6.0, 7.0, 8.0]
    out = run("breadcrumbs", [0.0] * 10, v.tolist(), ctx=MergeContext("t", ("a",)), density=0.5, gamma=0.2)
    assert torch.equal(out, (v * mask)[0])
    # outliers and kept entries that do not fit: fewer outliers dropped (mergekit's rule)
    assert primitives.magnitude_band(v, 0.9, 0.2).sum() == 9
    assert torch.equal(primitives.magnitude_band(v, 0.3, 0.0), primitives.top_magnitude(v, 0.3))


def test_breadcrumbs_at_full_density_is_average_and_its_ties_form_is_ties():
    torch.manual_seed(1)
    base, deltas = torch.randn(6, 4), torch.randn(3, 6, 4)
    ctx = MergeContext("w", ("a", "b", "c"))
    bc, avg = get_method("breadcrumbs"), get_method("average")
    assert torch.allclose(bc.merge(base, deltas, ctx, bc.resolve({"density": 1.0, "gamma": 0.0})),
                          avg.merge(base, deltas, ctx, {}), atol=1e-6)
    bt, ties = get_method("breadcrumbs_ties"), get_method("ties")
    assert torch.equal(bt.merge(base, deltas, ctx, bt.resolve({"density": 0.5, "gamma": 0.0})),
                       ties.merge(base, deltas, ctx, ties.resolve({"density": 0.5})))


def test_breadcrumbs_ties_hand_example():
    # density 0.5, gamma 0.25 on n = 4: drop the largest, keep the next 2.
    # e1 [3,-1,0.5,-2] -> [0,-1,0,-2]; e2 [-1,2,0.5,-4] -> [-1,2,0,0]; sum [-1,1,0,-2] elects [-,+,+,-]
    out = run("breadcrumbs_ties", [0.0] * 4, TIES_DELTAS, density=0.5, gamma=0.25)
    assert torch.equal(out, torch.tensor([-1.0, 2.0, 0.0, -2.0]))


def test_dare_ties_is_ties_fusion_of_the_dare_masks():
    torch.manual_seed(2)
    base, deltas = torch.randn(9, 5), torch.randn(4, 9, 5)
    dt, dare, ties = get_method("dare_ties"), get_method("dare"), get_method("ties")
    hp = dt.resolve({"p": 0.4, "seed": 5, "lambda": 0.5})
    masked = dare.prepare(deltas, CTX4, dare.resolve({"p": 0.4, "seed": 5}))  # the same masks as dare
    expected = base + 0.5 * ties.combine(torch.zeros_like(base), masked, CTX4, {"lambda": 1.0})
    assert torch.equal(dt.merge(base, deltas, CTX4, hp), expected)
    # p = 0 keeps everything: TIES at density 1
    assert torch.equal(dt.merge(base, deltas, CTX4, dt.resolve({"p": 0.0})),
                       ties.merge(base, deltas, CTX4, ties.resolve({"density": 1.0})))


def test_della_keep_probabilities_rise_with_rank_in_each_row():
    v = torch.tensor([[[0.1, -3.0, 2.0, 0.5], [1.0, 1.0, -1.0, 0.0]]])  # one expert, two rows
    q = primitives.ranked_keep_prob(v, 0.5, 0.1)
    step = 0.2 / 3
    assert torch.allclose(q[0, 0], torch.tensor([0.4, 0.4 + 3 * step, 0.4 + 2 * step, 0.4 + step]))
    assert torch.allclose(q[0, 1], torch.tensor([0.4 + step, 0.4 + 2 * step, 0.4 + 3 * step, 0.4]))  # ties: by position
    assert torch.allclose(q.mean(dim=-1), torch.full((1, 2), 0.5))
    assert torch.equal(primitives.ranked_keep_prob(torch.ones(2, 1), 0.3, 0.1), torch.full((2, 1), 0.3))


def test_della_rescales_each_survivor_by_its_own_keep_probability():
    torch.manual_seed(4)
    deltas = torch.randn(2, 8, 16)
    ctx = MergeContext("w", ("a", "b"))
    della = get_method("della")
    hp = della.resolve({"density": 0.5, "epsilon": 0.3, "seed": 1})
    prepared = della.prepare(deltas, ctx, hp)
    q = primitives.ranked_keep_prob(deltas, 0.5, 0.3)
    kept = prepared != 0
    assert 0.3 < kept.float().mean() < 0.7
    assert torch.allclose(prepared[kept], (deltas / q)[kept])
    # larger magnitudes survive more often (keep probability 0.8 for the largest of a row, 0.2 for the smallest)
    top = deltas.abs() >= deltas.abs().quantile(0.75, dim=-1, keepdim=True)
    assert kept[top].float().mean() > kept[~top].float().mean()
    assert della.keep is None  # per-entry rescale: no mask-and-scalar form, stored dense


def test_della_degenerates_to_ties_and_average_at_full_density():
    torch.manual_seed(5)
    base, deltas = torch.randn(5, 3), torch.randn(3, 5, 3)
    ctx = MergeContext("w", ("a", "b", "c"))
    della, linear = get_method("della"), get_method("della_linear")
    hp = della.resolve({"density": 1.0, "epsilon": 0.0})
    assert torch.equal(della.merge(base, deltas, ctx, hp), run("ties", base.tolist(), deltas.tolist(), ctx, density=1.0))
    assert torch.allclose(linear.merge(base, deltas, ctx, hp), base + deltas.mean(dim=0), atol=1e-6)


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("hp, span", [({"density": 0.05, "epsilon": 0.1}, "[-0.05, 0.15]"),
                                      ({"density": 0.95, "epsilon": 0.1}, "[0.85, 1.05]")])
def test_della_refuses_keep_probabilities_outside_0_1(name, hp, span):
    with pytest.raises(HyperparameterError) as err:
        get_method(name).resolve(hp)
    assert str(err.value).startswith(f"{name}: keep probabilities density ± epsilon = {span} must lie in (0, 1]")
    assert "lower epsilon=0.1 or move density=" in str(err.value)


def test_model_stock_ratio_from_the_angle():
    ms = get_method("model_stock")
    v1, v2 = [1.0, 0.0], [0.5, math.sqrt(3) / 2]  # cos θ = 0.5: t = 2·0.5/(1 + 0.5) = 2/3
    out = ms.merge(torch.zeros(2), torch.tensor([v1, v2]), CTX, {})
    assert torch.allclose(out, (2 / 3) * torch.tensor([0.75, math.sqrt(3) / 4]), atol=1e-6)
    assert torch.allclose(run("model_stock", [1.0, 1.0], [v1, v1]), torch.tensor([2.0, 1.0]))  # cos 1: t = 1
    assert torch.equal(run("model_stock", [1.0, 1.0], [[1.0, 0.0], [0.0, 2.0]]), torch.tensor([1.0, 1.0]))  # ⟂: base
    assert torch.equal(run("model_stock", [1.0, 1.0], [[1.0, 0.0], [-1.0, 0.1]]), torch.tensor([1.0, 1.0]))  # cos<0: 0
    assert torch.equal(run("model_stock", [1.0], [[0.0], [0.0]]), torch.tensor([1.0]))  # zero vectors: base
    one = MergeContext("t", ("a",))
    assert torch.equal(run("model_stock", [1.0, 2.0], [[3.0, -1.0]], one), torch.tensor([4.0, 1.0]))  # k = 1: expert
    # three vectors: the mean of the three pairwise cosines
    vs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    cos = (1 / math.sqrt(2) + 1 / math.sqrt(2) + 0.5) / 3
    assert math.isclose(get_method("model_stock").combine(torch.zeros(3), vs, CTX, {}).sum().item(),
                        3 * cos / (1 + 2 * cos) * vs.mean(dim=0).sum().item(), rel_tol=1e-6)


def test_tsv_m_of_one_expert_is_the_expert_and_orthogonal_tasks_add_up():
    tsv = get_method("tsv_m")
    torch.manual_seed(6)
    base, one = torch.randn(6, 4), torch.randn(1, 6, 4)
    assert torch.allclose(tsv.merge(base, one, MergeContext("w", ("a",)), tsv.resolve({})), base + one[0], atol=1e-5)
    # tasks in orthogonal subspaces (no interference): TSV-M keeps each whole, so the merge is their sum
    e, f = torch.eye(4), torch.eye(2)
    v1, v2 = 3.0 * torch.outer(e[0], f[0]), -2.0 * torch.outer(e[2], f[1])
    out = tsv.merge(torch.zeros(4, 2), torch.stack([v1, v2]), CTX, tsv.resolve({"alpha": 0.5}))
    assert torch.allclose(out, 0.5 * (v1 + v2), atol=1e-6)
    # tensors that are not matrices are averaged
    assert torch.equal(run("tsv_m", [1.0, 1.0], [[1.0, 2.0], [3.0, 0.0]]), torch.tensor([3.0, 2.0]))


def test_tsv_m_truncates_each_task_to_a_kth_of_its_rank():
    torch.manual_seed(7)
    deltas = torch.randn(4, 8, 8)
    merged = get_method("tsv_m").merge(torch.zeros(8, 8), deltas, CTX4, {"alpha": 1.0})
    assert torch.linalg.matrix_rank(merged).item() == 8  # 4 tasks × rank 2
    s = torch.linalg.svdvals(deltas)[:, :2].flatten().sort(descending=True).values
    assert torch.allclose(torch.linalg.svdvals(merged), s, atol=1e-4)  # orthogonalised: σs kept as they are


@pytest.mark.parametrize("name", NEW_METHODS)
def test_new_methods_are_documented_and_state_whether_incremental(name):
    from mergelab.engine.methods import incremental

    method = get_method(name)
    assert method.paper and "arXiv" in method.paper and method.mergekit and method.doc
    assert incremental(method) == (name in ("breadcrumbs", "della_linear"))
    assert method.whole_tensor == (name in ("model_stock", "tsv_m"))
    assert method.combine is not None or method.linear_scale is not None


def test_new_defaults_are_pinned():
    assert METHODS["dare_ties"].defaults == {"p": 0.2, "rescale": True, "seed": 0, "lambda": 1.0}
    assert METHODS["breadcrumbs"].defaults == {"density": 0.9, "gamma": 0.01, "lambda": 1.0}
    assert METHODS["breadcrumbs_ties"].defaults == METHODS["breadcrumbs"].defaults
    assert METHODS["della"].defaults == {"density": 0.5, "epsilon": 0.1, "lambda": 1.0, "rescale": True, "seed": 0}
    assert METHODS["model_stock"].defaults == {} and METHODS["tsv_m"].defaults == {"alpha": 1.0}


# ---- options: weights and filters ---------------------------------------------------------------------

def test_weights_and_filters_resolve_to_canonical_cache_keys():
    ties = get_method("ties")
    plain = canonical_hparams(ties.resolve({}))
    weighted = ties.resolve({"weights": " code:1.5, algebra:0.5 ,chat:1"})
    assert weighted["weights"] == "algebra:0.5,code:1.5"  # sorted, weight-1 entries dropped
    assert ties.resolve({"weights": {"code": 1.5, "algebra": 0.5}})["weights"] == weighted["weights"]
    assert canonical_hparams(weighted) != plain
    assert canonical_hparams(ties.resolve({"weights": "a:1", "exclude": ""})) == plain  # default options: old key
    assert ties.resolve({"exclude": "lm_head.weight,*embed*"})["exclude"] == "*embed*,lm_head.weight"
    assert canonical_hparams(ties.resolve({"include": "model.*"})) == '{"density":0.2,"include":"model.*","lambda":1.0}'


@pytest.mark.parametrize("hp, fragment", [
    ({"weights": "code"}, "ties.weights entry 'code': expected EXPERT:WEIGHT"),
    ({"weights": "code:-1"}, "weight of 'code' must be a finite number > 0, got '-1'"),
    ({"weights": "code:0"}, "must be a finite number > 0"),
    ({"weights": "code:nan"}, "must be a finite number > 0"),
    ({"weights": "code:x"}, "weight of 'code' must be a number, got 'x'"),
    ({"weights": "a:1,a:2"}, "names expert 'a' twice"),
    ({"weights": 3}, "ties.weights must be comma-separated text, got 3"),
    ({"exclude": "re:("}, "ties.exclude: 're:(' is not a regular expression"),
    ({"include": ["a,b"]}, "a pattern may not contain ','"),
    ({"weight": "a:1"}, "ties has no hyperparameter 'weight' (known: density, lambda, weights, include, exclude)"),
])
def test_bad_weights_and_filters_are_refused(hp, fragment):
    with pytest.raises(HyperparameterError) as err:
        get_method("ties").resolve(hp)
    assert fragment in str(err.value)


def test_filters_match_fnmatch_and_regex_names():
    hp = get_method("average").resolve({"exclude": "*embed_tokens*,re:layers\\.1\\."})
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert kept_from_base(hp, names) == [names[0], names[2]]
    inc = get_method("average").resolve({"include": "model.layers.*", "exclude": "*up_proj*"})
    assert [is_merged(inc, n) for n in names + ["model.layers.0.self_attn.q_proj.weight"]] == [False, False, False, True]
    with pytest.raises(HyperparameterError, match="average.exclude pattern 'lm_hed' matches no tensor of size 's'"):
        check_options("average", {"exclude": "lm_hed"}, names, ["a"], "size 's'")
    with pytest.raises(HyperparameterError, match="names expert 'cod', which is not an expert of size 's' .experts: a, b."):
        check_options("average", {"weights": "cod:2.0"}, names, ["a", "b"], "size 's'")


def test_weights_commute_with_every_per_expert_step():
    """Weighting after prepare (what the engine does) equals weighting before: each per-expert step is
    invariant to a positive scale of the task vector."""
    torch.manual_seed(8)
    deltas = torch.randn(4, 12, 6)
    w = [0.5, 2.0, 1.0, 3.25]
    for method in METHODS.values():
        if method.prepare is None:
            continue
        hp = method.resolve({})
        before = method.prepare(per_expert_scale(deltas, w), CTX4, hp)
        after = per_expert_scale(method.prepare(deltas, CTX4, hp), w)
        assert torch.allclose(before, after, rtol=1e-6, atol=1e-6), method.name
    assert expert_weights({"weights": "b:2.0"}, ["a", "b"]) == [1.0, 2.0] and expert_weights({}, ["a"]) is None


# ---- against PEFT's merge utilities, on the same tiny tensors ---------------------------------------

import peft.utils.merge_utils as peft_merge  # noqa: E402  (a test requirement: requirements-dev.txt)
pytestmark = pytest.mark.filterwarnings("ignore:The density .* no pruning will be performed")  # PEFT at density 1


def _peft_random_masks(shape, k, density, seed):
    """The Bernoulli masks PEFT's random pruning draws (torch.bernoulli on the global RNG), in its order."""
    torch.manual_seed(seed)
    return torch.stack([peft_merge.random_pruning(torch.ones(shape), density, rescale=False) for _ in range(k)])


def _distinct(k, *shape, seed=0):
    """Task vectors whose magnitudes are all distinct (no ties at a top-k threshold)."""
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    mags = torch.stack([(torch.randperm(n, generator=g).float() + 1) / n for _ in range(k)])
    signs = torch.randint(0, 2, (k, n), generator=g).float() * 2 - 1
    return (mags * signs).reshape(k, *shape)


@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
def test_ties_equals_peft_ties(density):
    deltas = _distinct(3, 8, 5)  # n = 40: density·n is an integer, as PEFT's int(density·n) needs
    ours = get_method("ties").merge(torch.zeros(8, 5), deltas, MergeContext("w", ("a", "b", "c")),
                                    get_method("ties").resolve({"density": density}))
    theirs = peft_merge.ties(list(deltas), torch.ones(3), density, majority_sign_method="total")
    assert torch.allclose(ours, theirs, atol=1e-7)


def test_ties_trim_equals_peft_magnitude_prune():
    deltas = _distinct(2, 10, 4, seed=1)
    ctx = MergeContext("w", ("a", "b"))
    prepared = get_method("ties").prepare(deltas, ctx, {"density": 0.3, "lambda": 1.0})
    theirs = peft_merge.magnitude_prune(list(deltas), torch.tensor([0.7, 1.3]), 0.3)
    assert torch.allclose(per_expert_scale(prepared, [0.7, 1.3]).sum(dim=0), theirs, atol=1e-7)


def test_task_arithmetic_and_weights_equal_peft_task_arithmetic():
    deltas = _distinct(3, 6, 2, seed=2)
    ta = get_method("task_arithmetic")
    w = [0.5, 1.5, 1.0]
    ours = ta.merge(torch.zeros(6, 2), per_expert_scale(deltas, w), MergeContext("w", ("a", "b", "c")), ta.resolve({}))
    theirs = peft_merge.task_arithmetic(list(deltas), torch.tensor(w) * 0.8 / 3)
    assert torch.allclose(ours, theirs, atol=1e-7)
    average = get_method("average").merge(torch.zeros(6, 2), deltas, MergeContext("w", ("a", "b", "c")), {})
    assert torch.allclose(average, peft_merge.task_arithmetic(list(deltas), torch.full((3,), 1 / 3)), atol=1e-7)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7])
def test_dare_formula_equals_peft_dare_linear_given_its_masks(p):
    """Masks come from different RNGs; given PEFT's masks, mergelab's formula (mask ⊙ v · keep_scale,
    averaged) is PEFT's dare_linear with weights 1/k."""
    deltas = _distinct(3, 7, 3, seed=3)
    masks = _peft_random_masks((7, 3), 3, 1 - p, seed=11)
    torch.manual_seed(11)
    theirs = peft_merge.dare_linear(list(deltas), torch.full((3,), 1 / 3), 1 - p)
    dare = get_method("dare")
    ours = (deltas * masks * dare.keep_scale(dare.resolve({"p": p}))).mean(dim=0)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_dare_ties_equals_peft_dare_ties_given_its_masks(p):
    deltas = _distinct(3, 6, 4, seed=4)
    masks = _peft_random_masks((6, 4), 3, 1 - p, seed=12)
    torch.manual_seed(12)
    theirs = peft_merge.dare_ties(list(deltas), torch.ones(3), 1 - p, majority_sign_method="total")
    method = get_method("dare_ties")
    hp = method.resolve({"p": p})
    ours = method.combine(torch.zeros(6, 4), deltas * masks * method.keep_scale(hp), CTX, hp)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_weighted_ties_differs_from_peft_where_documented():
    """With weights ≠ 1 PEFT elects signs on the unweighted vectors, mergelab on the weighted ones (the
    method runs on w_i·v_i): an entry where the weights flip the majority tells them apart."""
    deltas = torch.tensor([[1.0], [-0.6]])
    ties = get_method("ties")
    ours = ties.merge(torch.zeros(1), per_expert_scale(deltas, [1.0, 2.0]), CTX, ties.resolve({"density": 1.0}))
    theirs = peft_merge.ties(list(deltas), torch.tensor([1.0, 2.0]), 1.0)
    assert ours.item() == pytest.approx(-1.2) and theirs.item() == pytest.approx(1.0)
    assert "PEFT elects signs on the unweighted" in ties.mergekit


# ---- through the real engine ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_expert_size(tmp_path_factory):
    from mergelab.io.family import load_family
    from tests.helpers import build_tiny_family

    return load_family(build_tiny_family(tmp_path_factory.mktemp("four"), ("a1", "a2", "a3", "a4"))).sizes[0]


SETTINGS = [(name, {}) for name in NEW_METHODS] + [
    ("breadcrumbs", {"weights": "a1:0.5,a3:2", "exclude": "*embed_tokens*"}),
    ("average", {"weights": "a2:3", "include": "model.layers.*"}),
    ("dare_ties", {"weights": "a4:0.25", "exclude": "re:norm"}),
    ("model_stock", {"weights": "a1:2", "exclude": "*mlp*"}),
    ("tsv_m", {"weights": "a2:1.5"}),
    ("della_linear", {"weights": "a1:0.5"}),
]


@pytest.mark.parametrize("resident_dtype", [None, "bfloat16"])
def test_engine_incremental_and_combined_merges_equal_the_formula(four_expert_size, monkeypatch, resident_dtype):
    """Every new method (and weights and filters on linear, chunked and whole-tensor methods) merged by
    the session (prepared once, incremental swaps or chunked / whole-tensor combine) equals merging each
    subset straight from the formula, within 1e-6; excluded tensors hold the base bit for bit. With a
    bf16 resident (the CUDA layout, on the CPU): the fp32 merge rounded once (half a bf16 step)."""
    import itertools

    import mergelab.engine.session as engine
    from mergelab.engine.session import ExpertPool, MergeSession, ResidentModel, merge_rank

    monkeypatch.setattr(engine, "COMBINE_CHUNK", 1000)  # chunked combines cross tensor boundaries
    size = four_expert_size
    pool, fresh = ExpertPool.load(size), ExpertPool.load(size)
    direct = ResidentModel(fresh.base_checkpoint, "cpu")
    relative = 0.0
    if resident_dtype:
        monkeypatch.setattr(engine, "weight_dtype", lambda device: getattr(torch, resident_dtype))
        relative = 2.0 ** -8
    model = ResidentModel(pool.base_checkpoint, "cpu")
    session, formula = MergeSession(pool, model, refresh=4), MergeSession(fresh, direct)
    experts = pool.expert_names
    ordered = sorted((s for k in range(1, 5) for s in itertools.combinations(experts, k)),
                     key=lambda s: merge_rank(s, experts))
    worst, swaps = {}, 0
    for name, given in SETTINGS:
        method = get_method(name)
        hp = method.resolve(given)
        for subset in ordered:
            session.merge(method, hp, subset)
            swaps += session.updates > 0
            formula.merge_formula(method, hp, subset)
            for p_name, p in model.params.items():
                expected = direct.params[p_name]
                diff = ((p.float() - expected).abs() - relative * expected.abs()).max().item()
                worst[name, str(given)] = max(worst.get((name, str(given)), 0.0), diff)
                if not is_merged(hp, p_name):
                    assert torch.equal(p, fresh.base[p_name].to(p.dtype)), (name, p_name)
    assert max(worst.values()) < 1e-6, worst
    assert swaps > 10  # the linear ones did update by swaps
    # weights and filters change the merge: not the same weights as without them
    session.merge(get_method("breadcrumbs"), get_method("breadcrumbs").resolve({}), experts)
    plain = {n: p.clone() for n, p in model.params.items()}
    session.merge(get_method("breadcrumbs"), get_method("breadcrumbs").resolve(dict(SETTINGS[7][1])), experts)
    assert any(not torch.equal(plain[n], p) for n, p in model.params.items() if "layers" in n)
    embed = model.params["model.embed_tokens.weight"]
    assert torch.equal(embed, pool.base["model.embed_tokens.weight"].to(embed.dtype))


def test_tiny_sweep_with_every_new_method_and_weights_in_the_cache_key(tmp_path, capsys):
    """`mergelab sweep` with the new methods and `--hp weights=…` (every method) end to end: rows for
    each method at every k, weights in the cached hyperparameters, a second run fully cached, and an
    option that would do nothing refused before anything is merged."""
    from mergelab.store import ResultStore
    from tests.helpers import build_tiny_family
    from tests.test_sweep import cli

    manifest = build_tiny_family(tmp_path / "fam")
    db = tmp_path / "r.duckdb"
    methods = ",".join(NEW_METHODS)
    code, out, err = cli(capsys, "sweep", "--family", manifest, "--methods", methods, "--db", db,
                         "--hp", "weights=alpha:2", "--hp", "della.weights=beta:0.5", "--hp", "tsv_m.alpha=0.5")
    assert code == 0, err
    frame = ResultStore(db).results()
    for name in NEW_METHODS:
        rows = frame[frame.method == name]
        assert sorted(rows.k.unique()) == [1, 2, 3], name
        hp = json.loads(rows.hparams.iloc[0])
        assert hp["weights"] == ("beta:0.5" if name == "della" else "alpha:2.0"), name
    assert json.loads(frame[frame.method == "tsv_m"].hparams.iloc[0])["alpha"] == 0.5
    assert frame.loss.notna().all()
    code, out, _ = cli(capsys, "sweep", "--family", manifest, "--methods", methods, "--db", db,
                       "--hp", "weights=alpha:2", "--hp", "della.weights=beta:0.5", "--hp", "tsv_m.alpha=0.5")
    assert code == 0 and f"0 merges evaluated, {7 * 7 + 4} already cached" in out
    before = ResultStore(db).count()
    code, _, err = cli(capsys, "sweep", "--family", manifest, "--methods", "ties", "--db", db,
                       "--hp", "exclude=*embed_token*,lm_hed.weight")
    assert code == 2 and "ties.exclude pattern 'lm_hed.weight' matches no tensor of size 's'" in err
    code, _, err = cli(capsys, "sweep", "--family", manifest, "--methods", "ties", "--db", db, "--hp", "weights=gama:2")
    assert code == 2 and "ties.weights names expert 'gama', which is not an expert of size 's'" in err
    assert ResultStore(db).count() == before


def test_methods_command_shows_every_method_with_defaults_and_incrementality(capsys):
    from tests.test_sweep import cli

    code, out, _ = cli(capsys, "methods")
    assert code == 0
    for name, method in METHODS.items():
        block = out.split(f"\n{name}: ", 1)[1] if not out.startswith(f"{name}: ") else out[len(name) + 2:]
        status = block.split("\n    [", 1)[1].split("]", 1)[0]
        assert status.startswith("incremental" if method.linear_scale else "not incremental"), name
        for pname, p in method.params.items():
            assert f"    {pname} = {str(p.default).lower() if p.kind is bool else p.default}" in block, (name, pname)
    assert "[not incremental: combined per subset, whole tensors]" in out.split("tsv_m: ")[1]
    assert "weights: per-expert weights EXPERT:W" in out and "exclude: tensors matching" in out


def test_export_model_of_new_methods_with_options_and_their_mergekit_configs(tmp_path, capsys):
    """export-model writes each new method's merge (weights and filters applied) with its mergekit
    config, or says in the card why there is none; --mergekit-yaml refuses what mergekit cannot express."""
    from safetensors.torch import load_file

    from mergelab.engine.materialise import mergekit_yaml
    from mergelab.io.family import load_family
    from tests.helpers import build_tiny_family
    from tests.test_sweep import cli

    manifest = build_tiny_family(tmp_path / "fam")
    size = load_family(manifest).sizes[0]
    yaml = mergekit_yaml(size, "breadcrumbs", {"weights": "beta:3"}, ["alpha", "beta"])
    assert "merge_method: breadcrumbs" in yaml and "{weight: 0.5, density: 0.9, gamma: 0.01}" in yaml
    assert "{weight: 1.5, density: 0.9, gamma: 0.01}" in yaml and "normalize: false, rescale: false" in yaml
    assert "merge_method: dare_ties" in mergekit_yaml(size, "dare_ties", {}, ["alpha", "beta"])
    assert "filter_wise: false" in mergekit_yaml(size, "model_stock", {}, ["alpha", "beta"])
    for method, hp, fragment in [("tsv_m", {}, "TSV-M has no mergekit 0.1.5 equivalent"),
                                 ("ties", {"weights": "alpha:2"}, "per-expert weights of ties mean another formula"),
                                 ("average", {"exclude": "*norm*"}, "tensor filters (include/exclude)")]:
        with pytest.raises(HyperparameterError, match=re.escape(fragment)):
            mergekit_yaml(size, method, hp, ["alpha", "beta"])
    out = tmp_path / "merged"
    code, _, err = cli(capsys, "export-model", "--family", manifest, "--size", "s", "--method", "tsv_m",
                       "--experts", "alpha,beta", "--hp", "exclude=*embed_tokens*", "--out", out)
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert "TSV-M has no mergekit 0.1.5 equivalent." in card and 'tsv_m.exclude="*embed_tokens*"' in card
    merged, base = load_file(out / "model.safetensors"), load_file(size.base / "model.safetensors")
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_family_merge_table_sets_weights_and_filters_for_every_method(tmp_path, capsys):
    """A family's [merge] table gives every method its weights and filters (in the cache key) unless
    --hp overrides them; malformed entries are refused naming the manifest field."""
    from mergelab.errors import ManifestError
    from mergelab.io.family import load_family
    from mergelab.store import ResultStore
    from tests.helpers import build_tiny_family
    from tests.test_sweep import cli

    manifest = build_tiny_family(tmp_path / "fam")
    text = manifest.read_text()
    manifest.write_text(text + '\n[merge]\nweights = { beta = 2.0, alpha = 1 }\nexclude = ["*embed_tokens*"]\n')
    assert load_family(manifest).merge == {"weights": "beta:2.0", "exclude": "*embed_tokens*"}
    db = tmp_path / "r.duckdb"
    code, _, err = cli(capsys, "sweep", "--family", manifest, "--methods", "average,ties", "--k", "2", "--db", db,
                       "--hp", "ties.weights=gamma:0.5", "--no-reference")
    assert code == 0, err
    hps = {m: json.loads(h) for m, h in ResultStore(db).results()[["method", "hparams"]].drop_duplicates().values}
    assert hps["average"] == {"exclude": "*embed_tokens*", "weights": "beta:2.0"}
    assert hps["ties"]["weights"] == "gamma:0.5" and hps["ties"]["exclude"] == "*embed_tokens*"
    for bad, fragment in [('weights = "beta:-1"', "field merge.weights: weight of 'beta' must be a finite number > 0"),
                          ('weights = { omega = 2.0 }', "merge.weights names 'omega', which is not one of the family's domains"),
                          ('exlude = "x"', "field merge.exlude is not a merge option (weights, include, exclude)"),
                          ('include = 3', "merge.include must be comma-separated text, got 3")]:
        manifest.write_text(text + f"\n[merge]\n{bad}\n")
        with pytest.raises(ManifestError) as err:
            load_family(manifest)
        assert str(manifest) in str(err.value) and fragment in str(err.value), str(err.value)


def test_the_add_a_merge_method_worked_example_runs_and_matches_peft(monkeypatch):
    """docs/add-a-merge-method.md's module, run as written and registered: it is incremental, its split
    and mask forms equal its formula, and it equals PEFT's magnitude_prune."""
    import types
    from pathlib import Path

    from mergelab.engine import methods as registry

    doc = (Path(__file__).resolve().parents[1] / "docs" / "add-a-merge-method.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    module = types.ModuleType("magnitude_prune")
    exec(compile(code, "magnitude_prune.py", "exec"), module.__dict__)
    method = module.METHOD
    monkeypatch.setitem(registry.METHODS, method.name, method)
    assert registry.incremental(get_method("magnitude_prune")) and method.defaults == {"density": 0.2, "lambda": 1.0}
    deltas = _distinct(3, 10, 4, seed=9)
    ctx = MergeContext("w", ("a", "b", "c"))
    hp = method.resolve({"density": 0.25})
    direct = method.merge(torch.zeros(10, 4), deltas, ctx, hp)
    assert torch.allclose(direct, method.linear_scale(3, hp) * method.prepare(deltas, ctx, hp).sum(dim=0))
    assert torch.allclose(direct, peft_merge.magnitude_prune(list(deltas), torch.full((3,), 1 / 3), 0.25), atol=1e-7)


def test_weights_may_name_an_expert_of_any_swept_size(tmp_path):
    """Sizes with different experts: a weight for an expert one size has is used there and not refused
    for the other; one that no swept size has is refused, naming the sizes."""
    from mergelab.io.family import load_family, write_manifest
    from mergelab.store import ResultStore
    from mergelab.sweep.plan import SweepSpec
    from mergelab.sweep.runner import plan_sweep
    from tests.helpers import build_tiny_family

    one = load_family(build_tiny_family(tmp_path))
    s = one.size("s")
    rel = {e: str(p.relative_to(tmp_path)) for e, p in s.experts.items()}
    manifest = write_manifest(tmp_path / "family.toml", "two", one.domains,
                              {d: str(p.relative_to(tmp_path)) for d, p in one.eval_sets.items()},
                              [{"name": "s", "base": "s/base", "experts": rel},
                               {"name": "t", "base": "s/base", "experts": {"alpha": rel["alpha"], "beta": rel["beta"]}}],
                              token_budget=40)
    family = load_family(manifest)
    store = ResultStore(tmp_path / "r.duckdb")
    report, todo, _ = plan_sweep(SweepSpec(family, ["s", "t"], {"average": {"weights": "gamma:2"}}, [2]), store)
    assert {json.loads(i.hparams)["weights"] for items in todo.values() for i in items if i.method == "average"} == {
        "gamma:2.0"}
    with pytest.raises(HyperparameterError, match="names expert 'omega', which is not an expert of any of sizes s, t"):
        plan_sweep(SweepSpec(family, ["s", "t"], {"average": {"weights": "omega:2"}}, [2]), store)
