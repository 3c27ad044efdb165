"""Evidence for apo-ray: each module is a script, `python -m benchmarks.<name> [--quick]` (see README.md)."""
