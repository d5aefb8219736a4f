"""``quantize_with_budget``: the accuracy-budget search over a precision ladder (``entry``), its pure rules
(``rules``), its state and moves (``search``) and what it returns (``report``)."""
