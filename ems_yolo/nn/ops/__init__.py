"""The kernels room: one module per fused op, each holding the torch reference that defines it beside its Triton
version (the layout SpikingJelly 2.0 keeps as `_ops/<op>/{reference,triton}`).

Kernels are checked against their reference on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`)."""
