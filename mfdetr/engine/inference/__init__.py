"""Inference jobs: masks for image files (``mfdetr predict``: :mod:`.predict`, its checkpoint loading in
:mod:`.masknet_checkpoint`, overlay drawing in :mod:`.overlay`, input files in :mod:`.image_files`),
ONNX export (:mod:`.export`), latency per stage (:mod:`.latency`) and the box-prompted SAM baseline
(:mod:`.sam_baseline`, :mod:`.sam_model`)."""
