"""Export passes: turn a masked graph into what ships (``fold`` bakes masks into weights)."""
