"""The embedder at work: calibrated verification scores, galleries and open-set identification, clustering,
embedding photo folders into tables. Built on :mod:`facenet_hf.model` and :mod:`facenet_hf.evaluation`."""
