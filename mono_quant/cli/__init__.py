"""``mono-quant quantize | inspect | compare | export``: ``main`` parses and dispatches; ``inspect`` and
``export`` hold their subcommands."""
