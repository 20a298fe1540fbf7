"""FGC training application: gated ResNets, BAS then FGC with bank positives, torchrun launch.

Entry points: ``fgc-train`` / ``python -m trainer`` (:mod:`trainer.cli`) and the end-to-end
``python -m trainer.demo``. See ``trainer/README.md`` for a paragraph per module.
"""
