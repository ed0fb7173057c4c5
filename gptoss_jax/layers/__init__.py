"""Layers of the gpt-oss transformer: pure functions (tested directly) and the nnx modules holding
their parameters."""
