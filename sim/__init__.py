"""SimPy serving simulator (later issue)."""
