"""How a run is driven, above the tasks: callbacks and logger set-up (``callbacks``), the FSDP
strategy for large backbones (``strategies``) and the precision and threads chosen from the machine
(``hardware``)."""
