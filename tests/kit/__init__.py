"""Shared test material: small models and data (``helpers``), LightningModules (``lightning_modules``), bad-input
cases (``bad_input``), recurrent models (``recurrent_models``), transformers architectures from small configs
(``transformers_zoo``). Imported as ``kit.<module>`` (pytest puts ``tests/`` on the path)."""
