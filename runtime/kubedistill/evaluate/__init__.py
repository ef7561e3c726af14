"""Evaluation: pure metrics (:mod:`.metrics`), token scoring, generation, and the evaluate
stage (:func:`kubedistill.evaluate.stage.evaluate`)."""
