"""The demo domain generators: determinism, format bounds, and answers re-derived from prompts."""

import math
import re

import pytest

from mergelab.demo.domains import (
    BLOCKS, CODON_TABLE, DOMAINS, ELEMENT_MASS, MATH_BLOCK, SCIENCE_BLOCK, generate, parse_formula,
)

N = 500


@pytest.fixture(scope="module")
def samples():
    return {d: generate(d, N, 7) for d in DOMAINS}


def matching(examples, pattern):
    """(match, response) for every example whose prompt fully matches `pattern`."""
    hits = [(re.fullmatch(pattern, ex["prompt"], re.S), ex["response"]) for ex in examples]
    return [(m, r) for m, r in hits if m]


def terms(text):
    """{power: coefficient} of a polynomial written like '3x^2-x+4' (the generators' notation)."""
    out = {}
    for sign, coef, var, power in re.findall(r"([+-]?)(\d*)(x?)(?:\^(\d+))?", text):
        if coef or var:
            c = int(coef) if coef else 1
            out[int(power or 1) if var else 0] = -c if sign == "-" else c
    return out


def poly_value(text, x):
    return sum(c * x**k for k, c in terms(text).items())


def test_blocks_partition_domains():
    assert set(MATH_BLOCK) | set(SCIENCE_BLOCK) | {"code"} == set(DOMAINS)
    assert BLOCKS == {"math": MATH_BLOCK, "science": SCIENCE_BLOCK, "code": ("code",)}
    assert sum(len(b) for b in BLOCKS.values()) == len(DOMAINS) == 9


@pytest.mark.parametrize("domain", DOMAINS)
def test_deterministic_and_seed_sensitive(domain):
    assert generate(domain, 50, 3) == generate(domain, 50, 3)
    assert generate(domain, 50, 3) != generate(domain, 50, 4)


@pytest.mark.parametrize("domain", DOMAINS)
def test_prefix_stable(domain):
    assert generate(domain, 120, 5)[:40] == generate(domain, 40, 5)
    assert generate(domain, 0, 5) == []


@pytest.mark.parametrize("domain", DOMAINS)
def test_format_bounds(samples, domain):
    examples = samples[domain]
    assert len(examples) == N
    for ex in examples:
        assert set(ex) == {"prompt", "response"}
        assert ex["prompt"].isascii() and ex["response"].isascii()
        assert 0 < len(ex["prompt"]) <= 40, ex
        assert 0 < len(ex["response"]) <= 16, ex
        assert ex["response"] == ex["response"].strip() and "\n" not in ex["response"], ex
    assert len({ex["prompt"] for ex in examples}) > N // 10, "too little variety"


def test_unknown_domain_raises():
    with pytest.raises(ValueError, match="astrology") as info:
        generate("astrology", 3, 0)
    assert all(d in str(info.value) for d in DOMAINS)


def test_negative_n_raises():
    with pytest.raises(ValueError):
        generate("algebra", -1, 0)


def test_algebra(samples):
    ex = samples["algebra"]
    solves = matching(ex, r"Solve (.+)=(-?\d+)\. x = ")
    assert solves
    for m, r in solves:
        assert poly_value(m[1], int(r)) == int(m[2])
    evals = matching(ex, r"Let x=(\d+)\. (.+) = ")
    assert evals
    for m, r in evals:
        assert poly_value(m[2], int(m[1])) == int(r)
    expands = matching(ex, r"Expand \((.+)\)\((.+)\) = ")
    assert expands
    for m, r in expands:
        for x in range(-3, 4):
            assert poly_value(m[1], x) * poly_value(m[2], x) == poly_value(r, x)
    assert len(solves) + len(evals) + len(expands) == N


def test_analysis(samples):
    ex = samples["analysis"]
    derivs = matching(ex, r"d/dx (.+) = ")
    integrals = matching(ex, r"int (.+) dx = ")
    limits = matching(ex, r"lim x->(-?\d+) \((.+)\) = ")
    assert derivs and integrals and limits
    assert len(derivs) + len(integrals) + len(limits) == N
    for m, r in derivs:
        assert terms(r) == {k - 1: k * c for k, c in terms(m[1]).items() if k}
    for m, r in integrals:
        assert r.endswith("+C")
        anti = terms(r[:-2])
        assert 0 not in anti
        assert {k - 1: k * c for k, c in anti.items()} == terms(m[1])
    for m, r in limits:
        assert poly_value(m[2], int(m[1])) == int(r)


def check_integer_rules(examples, rules):
    """Every example matches one rule's prompt pattern, each rule matches some, and the response
    equals the rule applied to the integers captured from the prompt."""
    seen = 0
    for pattern, rule in rules.items():
        hits = matching(examples, pattern)
        assert hits, pattern
        for m, r in hits:
            assert rule(*map(int, m.groups())) == int(r), (m[0], r)
        seen += len(hits)
    assert seen == len(examples)


def test_geometry(samples):
    check_integer_rules(samples["geometry"], {
        r"Area of rect (\d+) by (\d+) = ": lambda w, h: w * h,
        r"Area of tri base (\d+) h (\d+) = ": lambda b, h: b * h / 2,
        r"Perimeter of rect (\d+) by (\d+) = ": lambda w, h: 2 * (w + h),
    })


def test_discrete(samples):
    check_integer_rules(samples["discrete"], {
        r"C\((\d+),(\d+)\) = ": math.comb,
        r"P\((\d+),(\d+)\) = ": math.perm,
        r"(\d+)! = ": math.factorial,
    })


def test_number_theory(samples):
    check_integer_rules(samples["number_theory"], {
        r"gcd\((\d+),(\d+)\) = ": math.gcd,
        r"lcm\((\d+),(\d+)\) = ": math.lcm,
        r"(\d+) mod (\d+) = ": lambda a, m: a % m,
    })
    gcds = matching(samples["number_theory"], r"gcd\((\d+),(\d+)\) = ")
    assert any(int(r) > 1 for _, r in gcds), "gcds should not all be trivial"


def test_code_runs_as_python(samples):
    safe_builtins = {"len": len, "sum": sum, "max": max, "min": min}
    prompts = [ex["prompt"] for ex in samples["code"]]
    assert any(p.startswith(">>> x=") for p in prompts)
    assert any(re.match(r">>> \[[\d,]+\]\[-?\d+\]", p) for p in prompts)
    assert any(re.match(r">>> (len|sum|max|min)\(", p) for p in prompts)
    for ex in samples["code"]:
        m = re.fullmatch(r">>> (.+)\n", ex["prompt"])
        assert m, ex
        *statements, expression = m[1].split("; ")
        scope = {"__builtins__": safe_builtins}
        for stmt in statements:
            exec(stmt, scope)
        assert str(eval(expression, scope)) == ex["response"], ex


def test_chemistry(samples):
    ex = samples["chemistry"]

    def mass(formula):
        return sum(ELEMENT_MASS[el] * n for el, n in parse_formula(formula).items())

    molar = matching(ex, r"Molar mass ([A-Za-z0-9]+) = ")
    atoms = matching(ex, r"Atoms in ([A-Za-z0-9]+) = ")
    moles = matching(ex, r"Mass of (\d+) mol ([A-Za-z0-9]+) = ")
    assert molar and atoms and moles and len(molar) + len(atoms) + len(moles) == N
    assert all(r == f"{mass(m[1])} g/mol" for m, r in molar)
    assert all(r == str(sum(parse_formula(m[1]).values())) for m, r in atoms)
    assert all(r == f"{int(m[1]) * mass(m[2])} g" for m, r in moles)
    assert any(m[1] == "H2O" for m, _ in molar + atoms) or any(m[2] == "H2O" for m, _ in moles)


def test_parse_formula():
    assert parse_formula("H2SO4") == {"H": 2, "S": 1, "O": 4}
    assert parse_formula("C6H12O6") == {"C": 6, "H": 12, "O": 6}


def test_physics(samples):
    ex = samples["physics"]
    laws = matching(ex, r"(\w)=(\w)(\w), \2=(\d+) (\S+) \3=(\d+) (\S+)\. \1 = ")
    kin = matching(ex, r"v=u\+at, u=(\d+) m/s a=(\d+) m/s2 t=(\d+) s\. v = ")
    conv = matching(ex, r"Convert (\d+) (\w+) to (\w+): ")
    assert laws and kin and conv and len(laws) + len(kin) + len(conv) == N
    units = {"F": "N", "V": "V", "P": "W", "d": "m", "W": "J"}
    for m, r in laws:
        assert r == f"{int(m[4]) * int(m[6])} {units[m[1]]}"
    for m, r in kin:
        assert r == f"{int(m[1]) + int(m[2]) * int(m[3])} m/s"
    factors = {("km", "m"): 1000, ("kg", "g"): 1000, ("min", "s"): 60, ("h", "min"): 60, ("m", "cm"): 100}
    for m, r in conv:
        assert r == f"{int(m[1]) * factors[m[2], m[3]]} {m[3]}"


def test_biology(samples):
    ex = samples["biology"]
    comps = matching(ex, r"Complement ([ACGT]+): ")
    trans = matching(ex, r"Translate ([ACGU]+): ")
    growth = matching(ex, r"(\d+) cells after (\d+) divisions = ")
    assert comps and trans and growth and len(comps) + len(trans) + len(growth) == N
    pair = str.maketrans("ACGT", "TGCA")
    assert all(r == m[1].translate(pair) for m, r in comps)
    for m, r in trans:
        codons = [m[1][i:i + 3] for i in range(0, len(m[1]), 3)]
        assert r == "-".join(CODON_TABLE[c] for c in codons)
    assert CODON_TABLE["AUG"] == "Met" and CODON_TABLE["UUU"] == "Phe"
    assert all(r == f"{int(m[1]) * 2 ** int(m[2])} cells" for m, r in growth)


def test_generation_is_fast():
    import time

    start = time.perf_counter()
    for d in DOMAINS:
        generate(d, 2000, 0)
    assert time.perf_counter() - start < 1.0
