"""Trace format v3: schema, reader, writer, summary, steps; model loading, capture, importers."""
