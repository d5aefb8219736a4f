"""Work on the model's graph: BatchNorm folding proven by data flow (``folding``), and the fused CNN graph for
CPU (``plan`` decides what fuses, ``fused_conv`` runs a convolution with its epilogue, ``fused_graph``
rewrites a traced graph and installs it)."""
