"""merge_grid.py's parts: spec (axes, cells, recipes), cells (one svd_merge per cell), metrics (against the
exact merge), files (what --save_to holds), runner (cells over processes), sweep (the run), sheet/plot
(PNGs, matplotlib optional), images (the optional diffusers path)."""
