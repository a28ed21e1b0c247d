"""The paper in miniature: CLIP vs CLIP-FT vs CLIPTeX on the built-in toy world (issue 15)."""
