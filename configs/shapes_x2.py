# LEGACY: an older recipe, kept so that the numbers docs/experiments.md reports for it can be rerun; the demo is configs/shapes.py.
# The demo's recipe with half its training (every stage's epochs x 2 of configs/shapes_v3.py instead
# of x 4), on the demo's world: about 40 minutes on 2 CPU cores. It was the demo before the x 4
# recipe was measured on 2 cores; one of the Table 5 runs (three seeds) is measured on it (the demo's
# own is `python shapes_ablate.py configs/shapes.py`, into out/ablate/shapes):
#   python train.py configs/shapes_x2.py
#   python shapes_ablate.py configs/shapes_x2.py      # Table 5, about 2.5 hours -> out/ablate/shapes_x2
# (docs/experiments.md §The demo's budget and §The x 2 recipe, three seeds).
import os

exec(open(os.path.join(os.path.dirname(__file__), "shapes.py")).read())  # the demo's world and model
out_dir = "out/shapes_x2"
stages = [dict(s, epochs=s["epochs"] / 2, out_dir=s["out_dir"].replace("out/shapes", out_dir))
          for s in stages]  # noqa: F821  (stages comes from the demo's config)
dtype, compile = "fp32", False  # the precision its Table 5 was measured in (the demo now trains in bf16, compiled)
