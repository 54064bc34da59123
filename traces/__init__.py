"""Trace format v1: schema, reader, writer, capture backends and workload importers."""
