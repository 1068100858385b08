"""Pipeline: the whole CPI-FT and GaLLoP pipelines from a config, resumable, and the demo.

settings (the dataclasses that declare every stage's settings, defaults and ranges, once),
config (read and validate a pipeline config against them), run (the stages and their reuse
records), demo (both pipelines on the built-in model; writes the result files the demo report reads).
"""
