"""Reading what the user has: the family manifest (`family`) and its checkpoints (`checkpoints`).

Nothing here merges or evaluates; everything above reads families through these modules."""
