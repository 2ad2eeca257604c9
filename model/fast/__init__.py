"""Opt-in speed and memory for the plain model of model/, applied from outside by one converter (convert.py:
`apply(model, attention_impl, ...)`), which swaps in the fast modules of modules.py: the same functions of their
inputs as the plain modules, computed with fewer passes over memory and fewer tensors kept for backward
(attention_paths.py: eager, sdpa, fused, blockwise; blockwise.py, relative_bias.py, softmax_dropout.py,
dropout.py, memory.py; Triton kernels in relative_kernels.py and fused_attention.py, imported only where they
may run). The state-dict layout is the plain model's."""
