"""Training: the settings (:mod:`.config`), optimizer and schedules (:mod:`.optim`),
metrics and overfitting watch (:mod:`.monitor`), multi-process setup
(:mod:`.distributed`) and the loop itself (:mod:`.trainer`)."""
