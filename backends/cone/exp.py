"""Exponential cones (placeholder: filled in by the nonsymmetric-cone step)."""

# Clarabel's central point of the exponential cone: s = z = −∇f(s) on it.
CENTRAL = (-1.051383945322714, 0.556409619469370, 1.258967884768947)
