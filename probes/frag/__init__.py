"""The frag probe: probe.py (hooks, collect, metrics, diagnose) and its own helpers."""
