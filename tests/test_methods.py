"""Each merge formula against hand-computed tiny tensors, including DESIGN §4's edge cases."""

import math

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
