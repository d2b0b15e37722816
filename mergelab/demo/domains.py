"""Deterministic prompt/response generators for the nine demo domains.

Every example is a short ASCII prompt (<= 40 chars) and a short response (<= 16 chars) that is
computable from the prompt by a simple rule, so tiny byte-level models can partly learn it.
Related domains share skills on purpose: the math block shares integer arithmetic and the
polynomial notation of `_poly`; the science block shares "<number> <unit>" answers and element
letters; `code` shares expression syntax (and `%`) with algebra and number theory.

`generate(domain, n, seed)` draws sequentially from `random.Random(f"{domain}:{seed}")`, so it is
reproducible across runs and platforms, and prefix-stable in `n`.
"""

from __future__ import annotations

import math
import random
import re
from typing import Callable

DOMAINS: tuple[str, ...] = ("algebra", "analysis", "geometry", "discrete", "number_theory", "code",
                            "chemistry", "physics", "biology")
MATH_BLOCK: tuple[str, ...] = ("algebra", "analysis", "geometry", "discrete", "number_theory")
SCIENCE_BLOCK: tuple[str, ...] = ("chemistry", "physics", "biology")
BLOCKS: dict[str, tuple[str, ...]] = {"math": MATH_BLOCK, "science": SCIENCE_BLOCK, "code": ("code",)}

Example = tuple[str, str]
Template = Callable[[random.Random], Example]

# Integer-rounded molar masses (g/mol), in Hill order; shared by chemistry's templates.
ELEMENT_MASS: dict[str, int] = {"C": 12, "H": 1, "N": 14, "O": 16, "S": 32}

# Real molecules over ELEMENT_MASS; chemistry mixes them with random Hill-ordered formulas.
MOLECULES: tuple[str, ...] = (
    "H2", "O2", "N2", "H2O", "H2O2", "CO", "CO2", "CH4", "NH3", "NO2", "N2O", "O3", "SO2", "SO3",
    "H2S", "H2SO4", "HNO3", "CH2O", "CH4O", "C2H6", "C2H4", "C2H2", "C2H6O", "C3H8", "C6H6", "C6H12O6",
)

# A 16-codon subset of the standard genetic code (RNA codons -> three-letter amino acids).
CODON_TABLE: dict[str, str] = {
    "AUG": "Met", "GCU": "Ala", "UUU": "Phe", "GGC": "Gly", "UGG": "Trp", "AAA": "Lys",
    "GAU": "Asp", "CAU": "His", "UCU": "Ser", "CCU": "Pro", "ACU": "Thr", "GUU": "Val",
    "CUG": "Leu", "AUU": "Ile", "UAU": "Tyr", "UGU": "Cys",
}
DNA_COMPLEMENT: dict[str, str] = {"A": "T", "T": "A", "G": "C", "C": "G"}

# Product laws "out = a * b": (equation, (a, unit), (b, unit), (out, unit)).
PRODUCT_LAWS = (
    ("F=ma", ("m", "kg"), ("a", "m/s2"), ("F", "N")),
    ("V=IR", ("I", "A"), ("R", "ohm"), ("V", "V")),
    ("P=VI", ("V", "V"), ("I", "A"), ("P", "W")),
    ("d=vt", ("v", "m/s"), ("t", "s"), ("d", "m")),
    ("W=Fd", ("F", "N"), ("d", "m"), ("W", "J")),
)
# Unit conversions: (from, to, factor).
CONVERSIONS = (("km", "m", 1000), ("kg", "g", 1000), ("min", "s", 60), ("h", "min", 60), ("m", "cm", 100))


# ---------------------------------------------------------------- shared formatting


def _poly(coeffs: list[int]) -> str:
    """Polynomial with coeffs[k] for x^k, highest degree first: [1, -4, 3] -> '3x^2-4x+1'."""
    out = ""
    for k in range(len(coeffs) - 1, -1, -1):
        c = coeffs[k]
        if c == 0:
            continue
        power = "" if k == 0 else "x" if k == 1 else f"x^{k}"
        mag = "" if abs(c) == 1 and k > 0 else str(abs(c))
        sign = "-" if c < 0 else "+" if out else ""
        out += sign + mag + power
    return out or "0"


def _eval_poly(coeffs: list[int], x: int) -> int:
    return sum(c * x**k for k, c in enumerate(coeffs))


def _qty(value: int, unit: str) -> str:
    return f"{value} {unit}"


def _nonzero(rng: random.Random, lo: int, hi: int) -> int:
    return rng.choice([v for v in range(lo, hi + 1) if v != 0])


def _formula(counts: dict[str, int]) -> str:
    """Hill-ordered formula, count omitted when 1: {'C': 1, 'H': 4} -> 'CH4'."""
    return "".join(el + (str(n) if n > 1 else "") for el, n in counts.items())


def parse_formula(formula: str) -> dict[str, int]:
    """'H2SO4' -> {'H': 2, 'S': 1, 'O': 4} (element order kept)."""
    return {el: int(n or 1) for el, n in re.findall(r"([A-Z][a-z]?)(\d*)", formula)}


def _random_molecule(rng: random.Random) -> dict[str, int]:
    if rng.random() < 0.5:
        return parse_formula(rng.choice(MOLECULES))
    chosen = rng.sample(list(ELEMENT_MASS), rng.randint(1, 3))
    return {el: rng.randint(1, 6) for el in ELEMENT_MASS if el in chosen}


def _molar_mass(counts: dict[str, int]) -> int:
    return sum(ELEMENT_MASS[el] * n for el, n in counts.items())


# ---------------------------------------------------------------- math block


def _algebra_solve(rng: random.Random) -> Example:
    x, a, b = rng.randint(1, 12), rng.randint(2, 9), _nonzero(rng, -20, 20)
    return f"Solve {_poly([b, a])}={a * x + b}. x = ", str(x)


def _algebra_evaluate(rng: random.Random) -> Example:
    x, coeffs = rng.randint(1, 5), [rng.randint(-9, 9), _nonzero(rng, -9, 9), rng.randint(0, 3)]
    return f"Let x={x}. {_poly(coeffs)} = ", str(_eval_poly(coeffs, x))


def _algebra_expand(rng: random.Random) -> Example:
    a, b = _nonzero(rng, -9, 9), _nonzero(rng, -9, 9)
    return f"Expand ({_poly([a, 1])})({_poly([b, 1])}) = ", _poly([a * b, a + b, 1])


def _random_poly(rng: random.Random, degree: int) -> list[int]:
    return [rng.randint(0, 9) for _ in range(degree)] + [rng.randint(1, 9)]


def _analysis_derivative(rng: random.Random) -> Example:
    coeffs = _random_poly(rng, rng.randint(2, 3))
    return f"d/dx {_poly(coeffs)} = ", _poly([k * c for k, c in enumerate(coeffs)][1:])


def _analysis_integral(rng: random.Random) -> Example:
    antiderivative = [0] + _random_poly(rng, rng.randint(1, 2))
    integrand = [k * c for k, c in enumerate(antiderivative)][1:]
    return f"int {_poly(integrand)} dx = ", _poly(antiderivative) + "+C"


def _analysis_limit(rng: random.Random) -> Example:
    x, coeffs = rng.randint(-3, 3), [rng.randint(-9, 9), rng.randint(-9, 9), rng.randint(1, 3)]
    return f"lim x->{x} ({_poly(coeffs)}) = ", str(_eval_poly(coeffs, x))


def _geometry_rect_area(rng: random.Random) -> Example:
    w, h = rng.randint(1, 20), rng.randint(1, 20)
    return f"Area of rect {w} by {h} = ", str(w * h)


def _geometry_tri_area(rng: random.Random) -> Example:
    base, h = 2 * rng.randint(1, 10), rng.randint(1, 20)
    return f"Area of tri base {base} h {h} = ", str(base * h // 2)


def _geometry_perimeter(rng: random.Random) -> Example:
    w, h = rng.randint(1, 20), rng.randint(1, 20)
    return f"Perimeter of rect {w} by {h} = ", str(2 * (w + h))


def _discrete_comb(rng: random.Random) -> Example:
    n = rng.randint(2, 12)
    k = rng.randint(0, n)
    return f"C({n},{k}) = ", str(math.comb(n, k))


def _discrete_perm(rng: random.Random) -> Example:
    n = rng.randint(2, 9)
    k = rng.randint(1, min(3, n))
    return f"P({n},{k}) = ", str(math.perm(n, k))


def _discrete_factorial(rng: random.Random) -> Example:
    n = rng.randint(0, 7)
    return f"{n}! = ", str(math.factorial(n))


def _nt_gcd(rng: random.Random) -> Example:
    g, a, b = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    return f"gcd({g * a},{g * b}) = ", str(math.gcd(g * a, g * b))


def _nt_lcm(rng: random.Random) -> Example:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"lcm({a},{b}) = ", str(math.lcm(a, b))


def _nt_mod(rng: random.Random) -> Example:
    a, m = rng.randint(1, 60), rng.randint(2, 12)
    return f"{a} mod {m} = ", str(a % m)


# ---------------------------------------------------------------- code

# Expression forms over x with two small constants: (source, value).
_CODE_EXPRS: tuple[tuple[str, Callable[[int, int, int], int]], ...] = (
    ("{a}*x+{b}", lambda x, a, b: a * x + b),
    ("x*x-{b}", lambda x, a, b: x * x - b),
    ("(x+{a})*{b}", lambda x, a, b: (x + a) * b),
    ("x%{a}+{b}", lambda x, a, b: x % a + b),
)


def _py_list(values: list[int]) -> str:
    return "[" + ",".join(map(str, values)) + "]"


def _code_expression(rng: random.Random) -> Example:
    source, fn = rng.choice(_CODE_EXPRS)
    x, a, b = rng.randint(1, 12), rng.randint(2, 9), rng.randint(1, 9)
    return f">>> x={x}; {source.format(a=a, b=b)}\n", str(fn(x, a, b))


def _code_index(rng: random.Random) -> Example:
    values = [rng.randint(0, 20) for _ in range(rng.randint(2, 5))]
    i = rng.randint(-len(values), len(values) - 1)
    return f">>> {_py_list(values)}[{i}]\n", str(values[i])


def _code_builtin(rng: random.Random) -> Example:
    name, fn = rng.choice((("len", len), ("sum", sum), ("max", max), ("min", min)))
    values = [rng.randint(0, 20) for _ in range(rng.randint(2, 5))]
    return f">>> {name}({_py_list(values)})\n", str(fn(values))


# ---------------------------------------------------------------- science block


def _chem_molar_mass(rng: random.Random) -> Example:
    counts = _random_molecule(rng)
    return f"Molar mass {_formula(counts)} = ", _qty(_molar_mass(counts), "g/mol")


def _chem_atoms(rng: random.Random) -> Example:
    counts = _random_molecule(rng)
    return f"Atoms in {_formula(counts)} = ", str(sum(counts.values()))


def _chem_mass_of_moles(rng: random.Random) -> Example:
    counts, moles = _random_molecule(rng), rng.randint(1, 5)
    return f"Mass of {moles} mol {_formula(counts)} = ", _qty(moles * _molar_mass(counts), "g")


def _physics_product_law(rng: random.Random) -> Example:
    equation, (a, a_unit), (b, b_unit), (out, out_unit) = rng.choice(PRODUCT_LAWS)
    x, y = rng.randint(1, 20), rng.randint(1, 20)
    return f"{equation}, {a}={_qty(x, a_unit)} {b}={_qty(y, b_unit)}. {out} = ", _qty(x * y, out_unit)


def _physics_kinematics(rng: random.Random) -> Example:
    u, a, t = rng.randint(0, 20), rng.randint(1, 9), rng.randint(1, 9)
    return f"v=u+at, u={u} m/s a={a} m/s2 t={t} s. v = ", _qty(u + a * t, "m/s")


def _physics_convert(rng: random.Random) -> Example:
    src, dst, factor = rng.choice(CONVERSIONS)
    value = rng.randint(1, 20)
    return f"Convert {_qty(value, src)} to {dst}: ", _qty(value * factor, dst)


def _bio_translate(rng: random.Random) -> Example:
    codons = [rng.choice(list(CODON_TABLE)) for _ in range(rng.randint(1, 3))]
    return f"Translate {''.join(codons)}: ", "-".join(CODON_TABLE[c] for c in codons)


def _bio_complement(rng: random.Random) -> Example:
    strand = "".join(rng.choice("ACGT") for _ in range(rng.randint(4, 10)))
    return f"Complement {strand}: ", "".join(DNA_COMPLEMENT[b] for b in strand)


def _bio_growth(rng: random.Random) -> Example:
    cells, divisions = rng.randint(1, 9), rng.randint(1, 5)
    return f"{cells} cells after {divisions} divisions = ", _qty(cells * 2**divisions, "cells")


TEMPLATES: dict[str, tuple[Template, ...]] = {
    "algebra": (_algebra_solve, _algebra_evaluate, _algebra_expand),
    "analysis": (_analysis_derivative, _analysis_integral, _analysis_limit),
    "geometry": (_geometry_rect_area, _geometry_tri_area, _geometry_perimeter),
    "discrete": (_discrete_comb, _discrete_perm, _discrete_factorial),
    "number_theory": (_nt_gcd, _nt_lcm, _nt_mod),
    "code": (_code_expression, _code_index, _code_builtin),
    "chemistry": (_chem_molar_mass, _chem_atoms, _chem_mass_of_moles),
    "physics": (_physics_product_law, _physics_kinematics, _physics_convert),
    "biology": (_bio_translate, _bio_complement, _bio_growth),
}


def generate(domain: str, n: int, seed: int) -> list[dict[str, str]]:
    """n examples {"prompt", "response"} for `domain`; same (domain, n, seed) -> same list.

    Drawn sequentially, so generate(d, m, s) is a prefix of generate(d, n, s) for m < n.
    Raises ValueError for an unknown domain or a negative n.
    """
    if domain not in TEMPLATES:
        raise ValueError(f"unknown domain {domain!r} (valid domains: {', '.join(DOMAINS)})")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{domain}:{seed}")
    templates = TEMPLATES[domain]
    examples = []
    for _ in range(n):
        prompt, response = rng.choice(templates)(rng)
        examples.append({"prompt": prompt, "response": response})
    return examples
