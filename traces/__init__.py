"""Trace format v2: schema, reader, writer, summary, steps; model loading, capture, importers."""
