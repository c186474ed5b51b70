"""Transform passes: rewrite the graph (``mask`` inserts mask-multiply nodes)."""
