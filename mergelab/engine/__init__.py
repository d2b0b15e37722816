"""Merging and evaluating in memory: merge methods (`methods/`), flat buffers (`flat`), the memory plan
(`memory`), the merge session over one resident model (`session`), response-only CE (`evaluate`), and
writing one merged model to disk (`materialise`)."""
