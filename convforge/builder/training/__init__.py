"""Training: the settings (:mod:`.config`), optimizer and schedules (:mod:`.optim`),
metrics and overfitting watch (:mod:`.monitor`), multi-process setup
(:mod:`.distributed`), the loop itself (:mod:`.trainer`) and what a run keeps
between epochs and across a resume (:mod:`.state`)."""
