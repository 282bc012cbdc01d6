"""The matching benchmark's test set (builder, sources, edits) and its runner."""
