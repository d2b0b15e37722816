"""Per-expert weights and tensor filters as the engine applies them: the text side (parsing, canonical
form, matching) is `mergelab.merge_options`, shared with the family manifest; this adds the tensor op."""

from mergelab.merge_options import (HELP, OPTIONS, check_options, expert_weights, is_merged,  # noqa: F401
                                    kept_from_base, options_key, resolve_options, weight_map)

__all__ = ["HELP", "OPTIONS", "check_options", "expert_weights", "is_merged", "kept_from_base", "options_key",
           "per_expert_scale", "resolve_options", "weight_map"]


def per_expert_scale(vectors, weights):
    """vectors [k, …] times one weight per expert (a list of k floats)."""
    from mergelab.engine.methods.primitives import per_expert_scale as scale

    return scale(vectors, weights)
