"""Active learning: exploration loops that run MD with a potential, select and label new data and retrain it
(above evaluation, which only uses models, and training, which fits them)."""
