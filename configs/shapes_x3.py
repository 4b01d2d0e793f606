# LEGACY: an older recipe, kept so that the numbers docs/experiments.md reports for it can be rerun; the demo is configs/shapes.py.
# The demo's recipe with three quarters of its training (every stage's epochs x 3 of configs/shapes_v3.py
# instead of x 4), in the demo's precision (bf16, compiled blocks), on the demo's world: the budget
# table's point near 20 minutes on 2 CPU cores (docs/experiments.md §The demo's budget).
#   python train.py configs/shapes_x3.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "shapes.py")).read())  # the demo's world and model
out_dir = "out/shapes_x3"
stages = [dict(s, epochs=s["epochs"] * 3 / 4, out_dir=s["out_dir"].replace("out/shapes", out_dir))
          for s in stages]  # noqa: F821  (stages comes from the demo's config)
